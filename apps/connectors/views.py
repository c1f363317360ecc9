from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Count
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import filters, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.connectors.exchanges import known_exchange_ids, offline_timeframes
from apps.connectors.models import Connector, validate_exchange_id
from apps.connectors.serializers import ConnectorSerializer
from datacollector.filters import SearchFilter
from datacollector.permissions import requires


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
