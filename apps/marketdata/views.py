import logging
from itertools import chain, islice

import django_filters
from django.http import FileResponse, Http404, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import viewsets
from rest_framework.decorators import action, api_view, permission_classes, renderer_classes
from rest_framework.exceptions import ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import IsAdminUser
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from apps.jobs.models import Task
from apps.marketdata import exports, store
from apps.marketdata.coverage import StatisticsList, coverage_rows
from apps.marketdata.indicators import (
    SeriesSelectionError,
    configured_indicators,
    describe_indicators,
    forget_configured_indicators,
    indicator_set,
    indicators_yaml,
    stored_series,
)
from apps.marketdata.models import Anomaly, Export, Gap, IndicatorConfig
from apps.marketdata.retention import drop_series
from apps.marketdata.serializers import (
    AnomalySerializer,
    CoveragePageSerializer,
    CoverageSerializer,
    CSVRenderer,
    DeletedSeriesSerializer,
    ExportRequestSerializer,
    ExportSerializer,
    GapSerializer,
    IndicatorComputeSerializer,
    ParquetRenderer,
    SeriesFilterSerializer,
    SeriesKeySerializer,
    SeriesQuerySerializer,
    candle_dict,
    csv_stream,
    cursor_page,
    format_time,
)
from datacollector.config import ConfigError, parse_indicators
from datacollector.permissions import requires
from datacollector.schema import ErrorSerializer

CANDLE_COLUMNS = ["ts", "time", "open", "high", "low", "close", "volume"]

PAGE_PARAMETERS = [
    OpenApiParameter("page", OpenApiTypes.INT, description="Page number, from 1."),
    OpenApiParameter("page_size", OpenApiTypes.INT, description="Series per page (default 50, at most 1,000)."),
]

logger = logging.getLogger(__name__)


def store_unavailable(error: Exception) -> Response:
    """503 for a MongoDB candle store that cannot be reached: the client may retry, nothing is wrong
    with its request."""
    logger.error("Candle store unavailable: %s", error)
    return Response({"detail": "The candle store (MongoDB) is unavailable; retry later."}, status=503)


class SeriesNegotiation(DefaultContentNegotiation):
    """DRF's negotiation, except that an unknown `?format=` is a 400 naming the parameter, not a 404."""

    def filter_renderers(self, renderers: list[BaseRenderer], format: str) -> list[BaseRenderer]:
        offered = [renderer for renderer in renderers if renderer.format == format]
        if not offered:
            names = [renderer.format for renderer in renderers if renderer.format != "api"]
            choices = f"{', '.join(names[:-1])} or {names[-1]}"
            raise ValidationError({"format": [f"format {format!r} is not offered: use {choices}."]})
        return offered


def series_endpoint(*, parquet: bool = False):
    """A GET endpoint over one stored series: JSON pages, the browsable API, streamed CSV, and with
    `parquet` a streamed Parquet file."""
    renderers = [JSONRenderer, BrowsableAPIRenderer, CSVRenderer] + ([ParquetRenderer] if parquet else [])
    formats = ["json", "csv"] + (["parquet"] if parquet else [])
    streamed = {(200, "text/csv"): OpenApiTypes.STR}
    if parquet:
        streamed[(200, ParquetRenderer.media_type)] = OpenApiTypes.BINARY

    def decorate(view):
        view = renderer_classes(renderers)(view)
        view = api_view(["GET"])(view)
        view.cls.content_negotiation_class = SeriesNegotiation
        return extend_schema(
            parameters=[
                SeriesQuerySerializer,
                OpenApiParameter(
                    "format",
                    OpenApiTypes.STR,
                    enum=formats,
                    description=f"{' and '.join(formats[1:])} stream every row.",
                ),
            ],
            responses={
                (200, "application/json"): OpenApiTypes.OBJECT,
                **streamed,
                (503, "application/json"): ErrorSerializer,
            },
        )(view)

    return decorate


@series_endpoint(parquet=True)
@permission_classes([requires("marketdata.view_candle")])
def ohlcv(request: Request) -> Response | StreamingHttpResponse:
    """Stored candles of one series, oldest first, bounds inclusive.

    JSON comes in pages of `limit` rows; `next` is the URL of the following page (null on the last).
    `?format=csv` streams the whole range (or `limit` rows when given) in one response; `?format=parquet`
    likewise, as a Parquet file (`ts` timestamp[ms, UTC], float64 values, a row group per 100,000 candles).
    """
    query = SeriesQuerySerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    params = query.validated_data
    series = (params["exchange_id"], params["symbol"], params["timeframe"])
    start, end = params.get("start"), params.get("end")
    try:
        if request.accepted_renderer.format == "csv":
            limit = params["limit"] if "limit" in request.query_params else None
            rows = store.iter_candles(*series, start_ts=start, end_ts=end, limit=limit)
            # Run the first query now, so that an unreachable store is a 503 rather than a cut stream.
            first = list(islice(rows, 1))
            response = StreamingHttpResponse(
                csv_stream(CANDLE_COLUMNS, ([row[0], format_time(row[0]), *row[1:]] for row in chain(first, rows))),
                content_type="text/csv; charset=utf-8",
            )
            filename = "-".join(part.replace("/", "").replace(":", "") for part in series)
            response["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
            return response
        if request.accepted_renderer.format == "parquet":
            limit = params["limit"] if "limit" in request.query_params else None
            pieces = exports.parquet_stream(*series, start_ts=start, end_ts=end, limit=limit)
            # Read the first chunk now, so that an unreachable store is a 503 rather than a cut stream.
            first = next(pieces)
            response = StreamingHttpResponse(chain([first], pieces), content_type=ParquetRenderer.media_type)
            filename = "-".join(part.replace("/", "").replace(":", "") for part in series)
            response["Content-Disposition"] = f'attachment; filename="{filename}.parquet"'
            return response
        limit = params["limit"]
        rows = store.read_candles(*series, start_ts=start, end_ts=end, limit=limit + 1)
    except store.UNAVAILABLE_ERRORS as error:
        return store_unavailable(error)
    return Response(cursor_page(request, params, [candle_dict(row) for row in rows], limit))


@series_endpoint()
@permission_classes([requires("marketdata.view_indicatorrow")])
def indicators(request: Request) -> Response | StreamingHttpResponse:
    """Stored indicators of one series, one row per candle, oldest first, bounds inclusive.

    Each row has `ts`, `time` and one column per configured indicator (`sma_20`, `ema_12`, `rsi_14`,
    `macd`, `macd_signal`, `macd_hist`, `bb_upper`, `bb_middle`, `bb_lower`, ...; `columns` lists them).
    A value is null until the indicator equals its textbook definition (TA-Lib) within 1e-8, e.g. for
    the first ~450 candles of RSI 14. Paging and `?format=csv` work as for `/data/ohlcv`.
    """
    query = SeriesQuerySerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    params = query.validated_data
    series = (params["exchange_id"], params["symbol"], params["timeframe"])
    names = indicator_set().names
    bounds = {"start_ts": params.get("start"), "end_ts": params.get("end")}

    def row_dict(ts: int, values: dict) -> dict:
        return {"ts": ts, "time": format_time(ts), **{name: values.get(name) for name in names}}

    if request.accepted_renderer.format == "csv":
        limit = params["limit"] if "limit" in request.query_params else None
        rows = store.iter_indicators(*series, **bounds, limit=limit)
        response = StreamingHttpResponse(
            csv_stream(
                ["ts", "time", *names],
                ([ts, format_time(ts), *(values.get(name) for name in names)] for ts, values in rows),
            ),
            content_type="text/csv; charset=utf-8",
        )
        filename = "-".join(part.replace("/", "").replace(":", "") for part in series)
        response["Content-Disposition"] = f'attachment; filename="{filename}-indicators.csv"'
        return response
    limit = params["limit"]
    rows = store.read_indicators(*series, **bounds, limit=limit + 1)
    page = cursor_page(request, params, [row_dict(ts, values) for ts, values in rows], limit)
    return Response({**page, "columns": names})


# --- Coverage, gaps, anomalies, series ------------------------------------------------------------


@extend_schema(
    parameters=[SeriesFilterSerializer, *PAGE_PARAMETERS],
    responses={200: CoveragePageSerializer, 404: ErrorSerializer, 503: ErrorSerializer},
)
@api_view(["GET"])
@permission_classes([requires("marketdata.view_candle")])
def coverage_view(request: Request) -> Response:
    """Coverage of every stored series (filters: exchange_id, symbol, timeframe), from the per-series
    statistics the store keeps with each write: no candle is counted. Paginated (`page`, `page_size`)."""
    query = SeriesFilterSerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    paginator = CoveragePagination()
    try:
        statistics = paginator.paginate_queryset(StatisticsList(**query.validated_data), request)
    except store.UNAVAILABLE_ERRORS as error:
        return store_unavailable(error)
    rows = coverage_rows(statistics, timezone.now())
    return paginator.get_paginated_response(CoverageSerializer(rows, many=True).data)


class CoveragePagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 1_000


class GapFilter(django_filters.FilterSet):
    class Meta:
        model = Gap
        fields = ["exchange_id", "symbol", "timeframe", "status"]


class GapViewSet(viewsets.ReadOnlyModelViewSet):
    """Runs of missing candles per series; open ones are refetched by the series' job."""

    queryset = Gap.objects.all()
    serializer_class = GapSerializer
    filterset_class = GapFilter

    @extend_schema(request=None, responses=GapSerializer)
    @action(detail=True, methods=["post"])
    def refetch(self, request: Request, pk: str | None = None) -> Response:
        """Reopen the gap and reset its attempts (as the admin's action): the series' job refetches it on
        its next run, even when it was confirmed empty."""
        gap = self.get_object()
        Gap.objects.filter(pk=gap.pk).reopen()
        gap.refresh_from_db()
        return Response(self.get_serializer(gap).data)


class AnomalyFilter(django_filters.FilterSet):
    class Meta:
        model = Anomaly
        fields = ["exchange_id", "symbol", "timeframe", "kind"]


class AnomalyViewSet(viewsets.ReadOnlyModelViewSet):
    """Stored candles that break an OHLC invariant (stored as sent, flagged here)."""

    queryset = Anomaly.objects.all()
    serializer_class = AnomalySerializer
    filterset_class = AnomalyFilter


@extend_schema(
    parameters=[SeriesKeySerializer],
    responses={200: DeletedSeriesSerializer, 404: ErrorSerializer, 503: ErrorSerializer},
)
@api_view(["DELETE"])
@permission_classes([IsAdminUser])
def series_view(request: Request) -> Response:
    """Delete one series: its candles, indicator rows, gaps, anomalies and statistics together (staff only).

    404 when nothing of the series is stored. The series' job, if any, is left alone (pause it first)."""
    query = SeriesKeySerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    params = query.validated_data
    try:
        deleted = drop_series(params["exchange_id"], params["symbol"], params["timeframe"])
    except store.UNAVAILABLE_ERRORS as error:
        return store_unavailable(error)
    if not any(deleted.values()):
        return Response({"detail": "No such series is stored."}, status=404)
    return Response(DeletedSeriesSerializer(deleted).data)


# --- Exports --------------------------------------------------------------------------------------

# Ids beyond PostgreSQL's bigint would be a database error, not a 404.
MAX_ID = 2**63 - 1


class IgnoreAccept(DefaultContentNegotiation):
    """JSON whatever the Accept header says: a download's file is not rendered, and its refusals are JSON."""

    def select_renderer(self, request: Request, renderers: list[BaseRenderer], format_suffix: str | None = None):
        return renderers[0], renderers[0].media_type


def visible_export(request: Request, pk: int) -> Export:
    exports_seen = Export.objects.visible_to(request.user).select_related("task")
    if pk > MAX_ID:
        raise Http404
    return get_object_or_404(exports_seen, pk=pk)


@extend_schema(
    request=ExportRequestSerializer,
    responses={(202, "application/json"): ExportSerializer, (503, "application/json"): ErrorSerializer},
)
@api_view(["POST"])
@permission_classes([requires("marketdata.add_export", "marketdata.view_candle")])
def export_create(request: Request) -> Response:
    """Queue an export of stored candles: answers 202 with the export, which a scheduler writes in the
    background (`GET /data/export/{id}` for status and progress, then `.../download`).

    `format`: csv, json (JSON Lines), parquet, or freqtrade (a zip of freqtrade's data directory). Several
    series (symbols x timeframes) give a zip with one file each. A range with no candles gives an export of
    zero rows; a range that may hold more than EXPORT_MAX_ROWS candles is a 400 saying the maximum.
    """
    serializer = ExportRequestSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    try:
        export = serializer.save(user=request.user)
    except store.UNAVAILABLE_ERRORS as error:
        return store_unavailable(error)
    location = reverse("data-export-detail", kwargs={"pk": export.pk})
    data = ExportSerializer(export, context={"request": request}).data
    return Response(data, status=202, headers={"Location": request.build_absolute_uri(location)})


@extend_schema(responses={200: ExportSerializer})
@api_view(["GET"])
@permission_classes([requires("marketdata.view_export")])
def export_detail(request: Request, pk: int) -> Response:
    """An export's status, progress, rows, size, error, expiry and download URL. Only its creator (or
    staff) sees it; anyone else gets 404."""
    export = visible_export(request, int(pk))
    return Response(ExportSerializer(export, context={"request": request}).data)


@extend_schema(
    responses={
        **{(200, media): OpenApiTypes.BINARY for media in sorted(set(exports.MEDIA_TYPES.values()))},
        (409, "application/json"): ErrorSerializer,
        (410, "application/json"): ErrorSerializer,
    }
)
@api_view(["GET"])
@renderer_classes([JSONRenderer])
@permission_classes([requires("marketdata.view_export")])
def export_download(request: Request, pk: int) -> Response | FileResponse:
    """The export's file (a zip for several series or the freqtrade layout), streamed. 409 while it is
    not written yet, 410 once it expired (its file is deleted then). Only its creator (or staff)."""
    export = visible_export(request, int(pk))
    if export.task.status != Task.Status.SUCCEEDED:
        detail = f"The export is {export.task.status}"
        detail += f": {export.task.error}" if export.task.error else "; download it once its status is succeeded."
        return Response({"detail": detail}, status=409)
    path = exports.export_path(export)
    if export.is_expired() or path is None or not path.is_file():
        expired = f" at {export.expires_at:%Y-%m-%dT%H:%M:%SZ}" if export.expires_at else ""
        return Response({"detail": f"The export expired{expired}; its file is deleted."}, status=410)
    return FileResponse(
        path.open("rb"), as_attachment=True, filename=path.name, content_type=exports.media_type(export)
    )


export_download.cls.content_negotiation_class = IgnoreAccept


# --- Indicators: the set in force, its configuration, and recomputes ------------------------------------


def _indicator_source() -> dict:
    row = IndicatorConfig.objects.filter(pk=IndicatorConfig.SINGLETON).select_related("updated_by").first()
    if row is None:
        return {"source": "collector.yaml", "updated_at": None, "updated_by": None}
    return {
        "source": "database",
        "updated_at": row.updated_at,
        "updated_by": row.updated_by.get_username() if row.updated_by else None,
    }


class IndicatorListView(APIView):
    """Each configured indicator: its parameters, output columns and warm-up (candles of history before its
    first stored value); `warmup` is the set's, what an update reads before its first new row."""

    permission_classes = [requires("marketdata.view_indicatorrow")]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        config = configured_indicators()
        indicators = describe_indicators(config)
        return Response(
            {
                **_indicator_source(),
                "count": len(indicators),
                "warmup": indicator_set(config).warmup,
                "columns": indicator_set(config).names,
                "indicators": indicators,
            }
        )


class IndicatorConfigView(APIView):
    """The indicator set in force, in the form of collector.yaml's `indicators` section. PUT stores one in the
    database (validated as the YAML is; it applies to every scheduler within seconds, to candles collected
    from then on: POST /api/v1/indicators/compute rebuilds stored series); DELETE goes back to the YAML's."""

    permission_classes = [requires("marketdata.view_indicatorconfig")]

    def get_permissions(self) -> list:
        perms = {"PUT": "marketdata.change_indicatorconfig", "DELETE": "marketdata.delete_indicatorconfig"}
        needed = perms.get(self.request.method)
        return [requires(needed)()] if needed else super().get_permissions()

    def _body(self) -> dict:
        return {**_indicator_source(), "config": indicators_yaml(configured_indicators())}

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(self._body())

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses=OpenApiTypes.OBJECT,
        examples=[
            OpenApiExample(
                "Short periods",
                value={"rsi": [14], "ema": [9, 21], "sma": [50], "macd": [{"fast": 12, "slow": 26, "signal": 9}]},
                request_only=True,
            )
        ],
    )
    def put(self, request: Request) -> Response:
        try:
            config = parse_indicators(request.data)
        except ConfigError as error:
            raise ValidationError({_config_field(str(error)): [str(error)]}) from None
        IndicatorConfig.objects.update_or_create(
            pk=IndicatorConfig.SINGLETON, defaults={"config": indicators_yaml(config), "updated_by": request.user}
        )
        forget_configured_indicators()
        return Response(self._body())

    @extend_schema(responses={204: None})
    def delete(self, request: Request) -> Response:
        IndicatorConfig.objects.filter(pk=IndicatorConfig.SINGLETON).delete()
        forget_configured_indicators()
        return Response(status=204)


def _config_field(message: str) -> str:
    """The body key a ConfigError message names ("indicators.macd[0].fast: ..." -> "macd")."""
    key = message.split(":", 1)[0]
    if not key.startswith("indicators."):
        return api_settings.NON_FIELD_ERRORS_KEY
    return key.removeprefix("indicators.").split(".")[0].split("[")[0]


class IndicatorComputeView(APIView):
    """Rebuild the indicators of stored series with the set in force, in the background: 202 with the task
    to poll (GET /api/v1/tasks/{id})."""

    permission_classes = [requires("marketdata.change_indicatorrow")]

    @extend_schema(request=IndicatorComputeSerializer, responses={202: OpenApiTypes.OBJECT})
    def post(self, request: Request) -> Response:
        serializer = IndicatorComputeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        params = serializer.validated_data
        try:
            series = stored_series(params["exchange_id"], params["symbols"], params["timeframes"])
        except SeriesSelectionError as error:
            if error.field == "series":
                message = f"symbols and timeframes {error.message}"
                raise ValidationError({api_settings.NON_FIELD_ERRORS_KEY: [message]}) from None
            raise ValidationError({error.field: [error.message]}) from None
        task = Task.objects.enqueue(Task.Kind.INDICATORS, params, request.user)
        url = reverse("task-detail", args=[task.pk])
        return Response(
            {"task": task.pk, "status": task.status, "series": len(series), "url": request.build_absolute_uri(url)},
            status=202,
            headers={"Location": url},
        )
