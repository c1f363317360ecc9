from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.decorators import api_view, renderer_classes
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from apps.marketdata import store
from apps.marketdata.serializers import (
    CSVRenderer,
    SeriesQuerySerializer,
    candle_dict,
    csv_stream,
    cursor_page,
    format_time,
)

CANDLE_COLUMNS = ["ts", "time", "open", "high", "low", "close", "volume"]


@extend_schema(
    parameters=[
        SeriesQuerySerializer,
        OpenApiParameter("format", OpenApiTypes.STR, enum=["json", "csv"], description="csv streams every row."),
    ],
    responses={(200, "application/json"): OpenApiTypes.OBJECT, (200, "text/csv"): OpenApiTypes.STR},
)
@api_view(["GET"])
@renderer_classes([JSONRenderer, BrowsableAPIRenderer, CSVRenderer])
def ohlcv(request: Request) -> Response | StreamingHttpResponse:
    """Stored candles of one series, oldest first, bounds inclusive.

    JSON comes in pages of `limit` rows; `next` is the URL of the following page (null on the last).
    `?format=csv` streams the whole range (or `limit` rows when given) in one response.
    """
    query = SeriesQuerySerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    params = query.validated_data
    series = (params["exchange_id"], params["symbol"], params["timeframe"])
    if request.accepted_renderer.format == "csv":
        limit = params["limit"] if "limit" in request.query_params else None
        rows = store.iter_candles(*series, start_ts=params.get("start"), end_ts=params.get("end"), limit=limit)
        response = StreamingHttpResponse(
            csv_stream(CANDLE_COLUMNS, ([row[0], format_time(row[0]), *row[1:]] for row in rows)),
            content_type="text/csv; charset=utf-8",
        )
        filename = "-".join(part.replace("/", "").replace(":", "") for part in series)
        response["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
        return response
    limit = params["limit"]
    rows = store.read_candles(*series, start_ts=params.get("start"), end_ts=params.get("end"), limit=limit + 1)
    return Response(cursor_page(request, params, [candle_dict(row) for row in rows], limit))


@api_view(["GET"])
def indicators(request: Request) -> Response:
    return Response({"detail": "Not implemented yet."}, status=501)
