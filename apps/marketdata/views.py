import logging
from itertools import chain, islice

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.decorators import api_view, permission_classes, renderer_classes
from rest_framework.exceptions import ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from apps.marketdata import store
from apps.marketdata.indicators import indicator_set
from apps.marketdata.serializers import (
    CSVRenderer,
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
