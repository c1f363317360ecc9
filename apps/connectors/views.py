import django_filters
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.db.models import Count, QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import filters, generics, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.connectors.exchanges import (
    PROFILES,
    ExchangeError,
    exchange_description,
    is_known_exchange,
    known_exchange_ids,
    offline_timeframes,
)
from apps.connectors.models import REFRESH_PATIENCE_SECONDS, Connector, Market, validate_exchange_id
from apps.connectors.serializers import ConnectorSerializer, MarketSerializer, RefreshResultSerializer
from apps.jobs.models import Task
from apps.monitoring.status import exchange_status
from datacollector.filters import SearchFilter
from datacollector.permissions import requires
from datacollector.schema import ErrorSerializer


class ConnectorViewSet(viewsets.ModelViewSet):
    """Exchange connectors: one per exchange. `start` activates all its jobs, `stop` pauses them."""

    queryset = Connector.objects.annotate(job_count=Count("jobs")).order_by("exchange_id")
    serializer_class = ConnectorSerializer
    filter_backends = [DjangoFilterBackend, SearchFilter, filters.OrderingFilter]
    filterset_fields = ["exchange_id", "enabled"]
    search_fields = ["exchange_id", "name"]
    ordering_fields = ["exchange_id", "name", "enabled", "created_at", "updated_at"]

    @extend_schema(request=None, responses=ConnectorSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        """Enable the connector and activate all its jobs (errors cleared, due at once)."""
        connector = self.get_object()
        touched = connector.start()
        return self._respond(connector, jobs=touched)

    @extend_schema(request=None, responses=ConnectorSerializer)
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        """Pause all the connector's jobs; they keep their cursors."""
        connector = self.get_object()
        touched = connector.stop()
        return self._respond(connector, jobs=touched)

    @extend_schema(
        request=None,
        responses={200: RefreshResultSerializer, 503: ErrorSerializer},
        description="Fetch the exchange's markets now (one markets request, its weight from the shared rate "
        f"limit, at most {REFRESH_PATIENCE_SECONDS:g} s) and store them: what changed. 503 when the exchange "
        "did not answer in time or refused.",
    )
    @action(detail=True, methods=["post"])
    def refresh(self, request: Request, pk: str | None = None) -> Response:
        """Refresh the connector's markets from the exchange."""
        connector = self.get_object()
        try:
            result = connector.refresh_markets(patience_seconds=REFRESH_PATIENCE_SECONDS)
        except ExchangeError as exc:
            return Response({"detail": f"Markets not refreshed: {exc}"}, status=503)
        return Response(result.as_dict())

    def perform_create(self, serializer: ConnectorSerializer) -> None:
        connector = serializer.save()
        # The exchange may be slow or far: its markets are fetched by a scheduler worker, not in this request.
        Task.objects.enqueue(Task.Kind.MARKETS, {"connector": connector.pk}, self.request.user)

    def _respond(self, connector: Connector, jobs: int) -> Response:
        connector = self.get_queryset().get(pk=connector.pk)
        return Response({**self.get_serializer(connector).data, "jobs_changed": jobs})


class ExchangeListView(APIView):
    """Accepted exchange ids; with `?exchange_id=` the timeframes that exchange offers."""

    # It lists the configured connectors.
    permission_classes = [requires("connectors.view_connector")]

    @extend_schema(
        parameters=[OpenApiParameter("exchange_id", OpenApiTypes.STR, description="Show one exchange's timeframes.")],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: Request) -> Response:
        configured = dict(Connector.objects.values_list("exchange_id", "pk"))
        exchange_id = request.query_params.get("exchange_id")
        if exchange_id is None:
            ids = known_exchange_ids()
            return Response({"count": len(ids), "exchanges": ids, "configured": sorted(configured)})
        try:
            validate_exchange_id(exchange_id)
        except DjangoValidationError as exc:
            raise ValidationError({"exchange_id": exc.messages}) from None
        timeframes = offline_timeframes(exchange_id)
        return Response(
            {
                "exchange_id": exchange_id,
                "timeframes": list(timeframes),
                # Without an offline list, any well-formed timeframe is accepted and the exchange has the
                # final word when the job runs.
                "timeframes_known": bool(timeframes),
                "connector": configured.get(exchange_id),
            }
        )


def _known_or_404(exchange_id: str) -> str:
    if not is_known_exchange(exchange_id):
        raise NotFound(
            f"Unknown exchange id {exchange_id!r}: use a ccxt exchange id (e.g. binance) or 'simulated'; "
            "GET /api/v1/exchanges lists them."
        )
    return exchange_id


def _timeframes(exchange_id: str) -> dict:
    timeframes = offline_timeframes(exchange_id)
    # Without an offline list, any well-formed timeframe is accepted and the exchange has the final word
    # when the job runs.
    return {"timeframes": list(timeframes), "timeframes_known": bool(timeframes)}


class ExchangeDetailView(APIView):
    """One exchange: its name, timeframes, whether it can fetch OHLCV, the limits it announces and those in
    force, its connector and markets (if any), and its status."""

    permission_classes = [requires("connectors.view_connector")]

    @extend_schema(operation_id="v1_exchanges_detail", responses={200: OpenApiTypes.OBJECT, 404: ErrorSerializer})
    def get(self, request: Request, exchange_id: str) -> Response:
        _known_or_404(exchange_id)
        connector = Connector.objects.filter(exchange_id=exchange_id).values("pk", "enabled").first()
        status = exchange_status(exchange_id)
        description = exchange_description(exchange_id)
        markets = Market.objects.filter(exchange_id=exchange_id).aggregate(
            total=Count("id"), active=Count("id", filter=models.Q(active=True))
        )
        profile = PROFILES.get(exchange_id)
        return Response(
            {
                "exchange_id": exchange_id,
                "name": description["name"],
                **_timeframes(exchange_id),
                "fetch_ohlcv": description["fetch_ohlcv"],
                "limits": {
                    # What the exchange publishes (or announced in its answers), and the shared bucket in force.
                    "announced_weight_per_minute": (status["bucket"] or {}).get("announced_weight_per_minute")
                    or (profile.weight_limit_per_minute if profile else None),
                    "ccxt_rate_limit_ms": description["ccxt_rate_limit_ms"],
                    "in_force": status["bucket"],
                },
                "connector": connector["pk"] if connector else None,
                "connector_enabled": connector["enabled"] if connector else None,
                "markets": {**markets, "known": markets["total"] > 0},
                "status": status["state"],
            }
        )


class ExchangeTimeframesView(APIView):
    """The timeframes an exchange offers (ccxt's offline list)."""

    permission_classes = [requires("connectors.view_connector")]

    @extend_schema(responses={200: OpenApiTypes.OBJECT, 404: ErrorSerializer})
    def get(self, request: Request, exchange_id: str) -> Response:
        return Response({"exchange_id": _known_or_404(exchange_id), **_timeframes(exchange_id)})


class ExchangeStatusView(APIView):
    """The exchange's shared bucket level, back-off, circuit breaker, last successful and failed runs, and
    the rate-limit answers (429/418) it sent in the last hour."""

    permission_classes = [requires("ratelimits.view_ratelimit")]

    @extend_schema(responses={200: OpenApiTypes.OBJECT, 404: ErrorSerializer})
    def get(self, request: Request, exchange_id: str) -> Response:
        return Response(exchange_status(_known_or_404(exchange_id)))


class MarketFilter(django_filters.FilterSet):
    quote = django_filters.CharFilter(lookup_expr="iexact", help_text="Quote currency, e.g. USDT.")
    base = django_filters.CharFilter(lookup_expr="iexact", help_text="Base currency, e.g. BTC.")
    active = django_filters.TypedChoiceFilter(
        choices=[("true", "true"), ("false", "false")],
        coerce=lambda value: value == "true",
        help_text="true: trading; false: inactive or delisted.",
    )
    type = django_filters.CharFilter(help_text="spot, swap, future, option.")

    class Meta:
        model = Market
        fields = ["quote", "base", "active", "type"]


class ExchangePairsView(generics.ListAPIView):
    """The markets (pairs) of an exchange, as its last markets refresh stored them; delisted ones included
    (inactive) unless `?active=true`."""

    serializer_class = MarketSerializer
    filter_backends = [DjangoFilterBackend, SearchFilter, filters.OrderingFilter]
    filterset_class = MarketFilter
    search_fields = ["symbol", "base", "quote", "market_id"]
    ordering_fields = ["symbol", "base", "quote", "first_seen", "last_seen"]
    queryset = Market.objects.all()

    def get_queryset(self) -> QuerySet:
        return Market.objects.filter(exchange_id=_known_or_404(self.kwargs["exchange_id"])).order_by("symbol")
