import logging
from itertools import chain, islice

from django.http import FileResponse, Http404, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.decorators import api_view, permission_classes, renderer_classes
from rest_framework.exceptions import ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs.models import Task
from apps.marketdata import exports, store
from apps.marketdata.indicators import indicator_set
from apps.marketdata.models import Export
from apps.marketdata.serializers import (
    CSVRenderer,
    ExportRequestSerializer,
    ExportSerializer,
    SeriesQuerySerializer,
    candle_dict,
    csv_stream,
    cursor_page,
    format_time,
)
from datacollector.permissions import requires
from datacollector.schema import ErrorSerializer

CANDLE_COLUMNS = ["ts", "time", "open", "high", "low", "close", "volume"]

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
            raise ValidationError({"format": [f"format {format!r} is not offered: use json or csv."]})
        return offered


def series_endpoint(view):
    """A GET endpoint over one stored series: JSON pages, the browsable API, or streamed CSV."""
    view = renderer_classes([JSONRenderer, BrowsableAPIRenderer, CSVRenderer])(view)
    view = api_view(["GET"])(view)
    view.cls.content_negotiation_class = SeriesNegotiation
    return extend_schema(
        parameters=[
            SeriesQuerySerializer,
            OpenApiParameter("format", OpenApiTypes.STR, enum=["json", "csv"], description="csv streams every row."),
        ],
        responses={
            (200, "application/json"): OpenApiTypes.OBJECT,
            (200, "text/csv"): OpenApiTypes.STR,
            (503, "application/json"): ErrorSerializer,
        },
    )(view)


@series_endpoint
@permission_classes([requires("marketdata.view_candle")])
def ohlcv(request: Request) -> Response | StreamingHttpResponse:
    """Stored candles of one series, oldest first, bounds inclusive.

    JSON comes in pages of `limit` rows; `next` is the URL of the following page (null on the last).
    `?format=csv` streams the whole range (or `limit` rows when given) in one response.
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
        limit = params["limit"]
        rows = store.read_candles(*series, start_ts=start, end_ts=end, limit=limit + 1)
    except store.UNAVAILABLE_ERRORS as error:
        return store_unavailable(error)
    return Response(cursor_page(request, params, [candle_dict(row) for row in rows], limit))


@series_endpoint
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
