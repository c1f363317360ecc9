"""Query parameters and output helpers of the data API (`/api/v1/data/...`).

Shared by every endpoint that reads one stored series over a time range (OHLCV, indicators): the
parameters are validated by `SeriesQuerySerializer` (a 400 names the parameter), pages are cursor-style
(`next` continues at the last row's ts + 1, so paging through millions of rows costs the same per page
and never counts the whole range), and rows can also be streamed as CSV.
"""

import csv
import io
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

from django.core.exceptions import ValidationError as DjangoValidationError
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.utils.urls import replace_query_param

from apps.connectors.exchanges import is_known_exchange
from apps.marketdata import exports
from apps.marketdata.exports import request_export
from apps.marketdata.models import Anomaly, Export, Gap
from apps.marketdata.timeframes import datetime_to_ms, is_valid_timeframe, timeframe_error

DEFAULT_LIMIT = 1_000
MAX_LIMIT = 10_000

_EPOCH_MS_RE = re.compile(r"^[0-9]+$")

# The range of a time parameter: the epoch (no candle is older) to the last millisecond of year 9999,
# the last that Python's datetime, and so every time the API writes out, can hold.
MIN_TIME_MS = 0
MAX_TIME_MS = 253_402_300_799_999
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_RANGE = f"from 1970-01-01T00:00:00Z (0) to 9999-12-31T23:59:59.999Z ({MAX_TIME_MS})"


def parse_time_ms(value: str, name: str = "time") -> int:
    """UTC milliseconds from epoch milliseconds (digits only) or an ISO 8601 date or datetime.

    A date means its 00:00 UTC; a datetime without an offset is taken as UTC; one with an offset is
    converted. Raises ValueError with a message fit for the user, naming the parameter `name`.
    """
    value = str(value).strip()
    shown = repr(value if len(value) <= 40 else f"{value[:37]}...")
    if _EPOCH_MS_RE.match(value):
        # More digits than the largest accepted value has are out of range, however many there are.
        ms = int(value) if len(value) <= len(str(MAX_TIME_MS)) else MAX_TIME_MS + 1
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            hint = ""
            if re.search(r"\d \d{2}:?\d{2}$", value):
                # A "+02:00" offset typed into a URL arrives as " 02:00": "+" means a space in a query string.
                hint = " (write a '+' offset as %2B in a URL, or use Z)"
            raise ValueError(
                f"{name} {shown} is not a date: use epoch milliseconds (1704067200000) or ISO 8601 in UTC "
                f"(2024-01-01 or 2024-01-01T00:00:00Z){hint}."
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ms = datetime_to_ms(moment)
    if ms < MIN_TIME_MS:
        raise ValueError(f"{name} {shown} is before 1970-01-01, where no candle can be: use a time {_TIME_RANGE}.")
    if ms > MAX_TIME_MS:
        raise ValueError(f"{name} {shown} is after year 9999: use a time {_TIME_RANGE}.")
    return ms


def format_time(ts: int) -> str:
    """ISO 8601 UTC of a ms timestamp: 2024-01-01T00:00:00Z (milliseconds shown only when present)."""
    moment = _EPOCH + timedelta(milliseconds=ts)  # Exact, unlike float seconds near year 9999.
    return moment.isoformat(timespec="seconds" if ts % 1000 == 0 else "milliseconds").replace("+00:00", "Z")


@extend_schema_field(OpenApiTypes.STR)
class TimestampField(serializers.Field):
    """A point in time given as epoch milliseconds or an ISO 8601 date/datetime (UTC); holds UTC ms."""

    def to_internal_value(self, data: object) -> int:
        try:
            return parse_time_ms(str(data), self.field_name)
        except ValueError as error:
            raise serializers.ValidationError(str(error)) from None

    def to_representation(self, value: int) -> int:
        return value


class SeriesQuerySerializer(serializers.Serializer):
    """One series and an inclusive time range, with a page size: the query of every data endpoint."""

    exchange_id = serializers.CharField(max_length=64, help_text="ccxt exchange id, or simulated.")
    symbol = serializers.CharField(max_length=64, help_text="ccxt unified symbol, e.g. BTC/USDT.")
    timeframe = serializers.CharField(max_length=8, help_text="Candle length, e.g. 1m, 1h, 1d.")
    start = TimestampField(
        required=False, help_text="First candle open time, inclusive: epoch ms or ISO 8601 (UTC). Default: oldest."
    )
    end = TimestampField(
        required=False, help_text="Last candle open time, inclusive: epoch ms or ISO 8601 (UTC). Default: newest."
    )
    limit = serializers.IntegerField(
        required=False,
        default=DEFAULT_LIMIT,
        min_value=1,
        max_value=MAX_LIMIT,
        help_text=f"Rows per page (1 to {MAX_LIMIT}, default {DEFAULT_LIMIT}). Follow `next` for more.",
    )

    def validate_exchange_id(self, value: str) -> str:
        if not is_known_exchange(value):
            raise serializers.ValidationError(
                f"Unknown exchange {value!r}: use a ccxt exchange id (e.g. binance) or simulated; "
                "GET /api/v1/exchanges lists them."
            )
        return value

    def validate_timeframe(self, value: str) -> str:
        if not is_valid_timeframe(value):
            raise serializers.ValidationError(timeframe_error(value))
        return value

    def validate(self, attrs: dict) -> dict:
        start, end = attrs.get("start"), attrs.get("end")
        if start is not None and end is not None and start > end:
            raise serializers.ValidationError(
                {"start": f"start ({format_time(start)}) is after end ({format_time(end)})."}
            )
        return attrs


def next_page_url(request: Request, next_start: int) -> str:
    """The request's own URL with `start` moved to `next_start`: every other parameter is kept."""
    return replace_query_param(request.build_absolute_uri(), "start", next_start)


def cursor_page(request: Request, query: dict, rows: list, limit: int, key=lambda row: row["ts"]) -> dict:
    """A page of at most `limit` rows; `rows` may hold one more, which only tells that a next page exists.

    Reading limit + 1 rows avoids a `next` link that leads to an empty page when the range ends exactly
    at a page boundary.
    """
    has_more = len(rows) > limit
    rows = rows[:limit]
    return {
        "exchange_id": query["exchange_id"],
        "symbol": query["symbol"],
        "timeframe": query["timeframe"],
        "count": len(rows),
        "next": next_page_url(request, key(rows[-1]) + 1) if has_more else None,
        "results": rows,
    }


def candle_dict(row: list) -> dict:
    ts, open_, high, low, close, volume = row
    return {
        "ts": ts,
        "time": format_time(ts),
        "open": open_,
        "high": high,
        "low": low,
        "close": close,
        "volume": volume,
    }


class CSVRenderer(BaseRenderer):
    """Lets `?format=csv` (or `Accept: text/csv`) select CSV. Views stream their rows themselves with
    `csv_stream`; what reaches this renderer is an error body, written as field,error lines."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(
        self, data: object, accepted_media_type: str | None = None, renderer_context: dict | None = None
    ) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["field", "error"])
        items = data.items() if isinstance(data, dict) else [("detail", data)]
        for field, messages in items:
            for message in messages if isinstance(messages, list) else [messages]:
                writer.writerow([field, str(message)])
        return buffer.getvalue().encode(self.charset)


class ParquetRenderer(BaseRenderer):
    """Lets `?format=parquet` (or `Accept: application/vnd.apache.parquet`) select Parquet. The view streams
    the file itself (exports.parquet_stream); what reaches this renderer is an error body, written as JSON
    with a JSON content type, since no Parquet reader could show it."""

    media_type = exports.MEDIA_TYPES["parquet"]
    format = "parquet"
    charset = None

    def render(
        self, data: object, accepted_media_type: str | None = None, renderer_context: dict | None = None
    ) -> bytes:
        response = (renderer_context or {}).get("response")
        if response is not None:
            response["Content-Type"] = "application/json"
        return JSONRenderer().render(data)


def csv_stream(header: list[str], rows: Iterable[list], rows_per_chunk: int = 1_000) -> Iterator[str]:
    """CSV text in chunks of `rows_per_chunk` rows, for a StreamingHttpResponse."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    pending = 0
    for row in rows:
        writer.writerow(row)
        pending += 1
        if pending >= rows_per_chunk:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    yield buffer.getvalue()


# --- Coverage, gaps, anomalies, series ------------------------------------------------------------


class SeriesFilterSerializer(serializers.Serializer):
    """Optional exact filters on the series (coverage); a malformed timeframe is a 400 naming it."""

    exchange_id = serializers.CharField(max_length=64, required=False, help_text="ccxt exchange id.")
    symbol = serializers.CharField(max_length=64, required=False, help_text="ccxt unified symbol, e.g. BTC/USDT.")
    timeframe = serializers.CharField(max_length=8, required=False, help_text="Candle length, e.g. 1m, 1h, 1d.")

    def validate_timeframe(self, value: str) -> str:
        if not is_valid_timeframe(value):
            raise serializers.ValidationError(timeframe_error(value))
        return value


class SeriesKeySerializer(SeriesFilterSerializer):
    """One whole series (DELETE /data/series): all three fields required."""

    exchange_id = serializers.CharField(max_length=64, help_text="ccxt exchange id.")
    symbol = serializers.CharField(max_length=64, help_text="ccxt unified symbol, e.g. BTC/USDT.")
    timeframe = serializers.CharField(max_length=8, help_text="Candle length, e.g. 1m, 1h, 1d.")


class CoverageSerializer(serializers.Serializer):
    exchange_id = serializers.CharField()
    symbol = serializers.CharField()
    timeframe = serializers.CharField()
    first_ts = serializers.IntegerField(help_text="Open time of the oldest stored candle, UTC ms.")
    first_time = serializers.SerializerMethodField()
    last_ts = serializers.IntegerField(help_text="Open time of the newest stored candle, UTC ms.")
    last_time = serializers.SerializerMethodField()
    candles = serializers.IntegerField(help_text="Candles stored.")
    expected = serializers.IntegerField(help_text="Slots of the timeframe from the first to the last candle.")
    completeness = serializers.FloatField(help_text="candles / expected, 0 to 1.")
    open_gaps = serializers.IntegerField(help_text="Open gaps (refetched by the job's next runs).")
    missing = serializers.IntegerField(help_text="Candles missing in the open gaps.")
    confirmed_empty = serializers.IntegerField(help_text="Slots the exchange confirmed empty.")
    anomalies = serializers.IntegerField(help_text="Stored candles breaking an OHLC invariant.")
    last_collected_at = serializers.DateTimeField(allow_null=True, help_text="Last write to the series.")
    last_closed_ts = serializers.IntegerField(help_text="Open time of the newest closed candle now, UTC ms.")
    lag_candles = serializers.IntegerField(help_text="Closed candles newer than the newest stored one.")
    lag_seconds = serializers.IntegerField(
        help_text="How far the newest stored candle is behind the newest closed one."
    )

    def get_first_time(self, row: dict) -> str:
        return format_time(row["first_ts"])

    def get_last_time(self, row: dict) -> str:
        return format_time(row["last_ts"])


class CoveragePageSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = CoverageSerializer(many=True)


class GapSerializer(serializers.ModelSerializer):
    start_time = serializers.SerializerMethodField()
    end_time = serializers.SerializerMethodField()

    class Meta:
        model = Gap
        fields = [
            "id",
            "exchange_id",
            "symbol",
            "timeframe",
            "start_ts",
            "start_time",
            "end_ts",
            "end_time",
            "missing",
            "status",
            "attempts",
            "detected_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_start_time(self, gap: Gap) -> str:
        return format_time(gap.start_ts)

    def get_end_time(self, gap: Gap) -> str:
        return format_time(gap.end_ts)


class AnomalySerializer(serializers.ModelSerializer):
    time = serializers.SerializerMethodField()

    class Meta:
        model = Anomaly
        fields = ["id", "exchange_id", "symbol", "timeframe", "ts", "time", "kind", "open", "high", "low", "close"]
        fields += ["detected_at"]
        read_only_fields = fields

    def get_time(self, anomaly: Anomaly) -> str:
        return format_time(anomaly.ts)


class DeletedSeriesSerializer(serializers.Serializer):
    candles = serializers.IntegerField()
    indicators = serializers.IntegerField()
    gaps = serializers.IntegerField()
    anomalies = serializers.IntegerField()


# --- Exports --------------------------------------------------------------------------------------


class ExportRequestSerializer(serializers.Serializer):
    """POST /data/export: what to export. The rules (known symbols, the row maximum, ...) are
    `exports.validate_export`'s, called by `request_export` when the export is created."""

    exchange_id = serializers.CharField(max_length=64, help_text="ccxt exchange id, or simulated.")
    symbols = serializers.ListField(
        child=serializers.CharField(max_length=64), allow_empty=False, max_length=200, help_text='e.g. ["BTC/USDT"].'
    )
    timeframes = serializers.ListField(
        child=serializers.CharField(max_length=8), allow_empty=False, max_length=50, help_text='e.g. ["1m", "1h"].'
    )
    start = TimestampField(required=False, help_text="First candle open time, inclusive: epoch ms or ISO 8601 (UTC).")
    end = TimestampField(required=False, help_text="Last candle open time, inclusive: epoch ms or ISO 8601 (UTC).")
    format = serializers.CharField(max_length=16, help_text="csv, json (JSON Lines), parquet or freqtrade.")
    indicators = serializers.BooleanField(default=False, help_text="Add one column per configured indicator.")

    def create(self, validated_data: dict) -> "Export":
        try:
            return request_export(
                exchange_id=validated_data["exchange_id"],
                symbols=validated_data["symbols"],
                timeframes=validated_data["timeframes"],
                start_ts=validated_data.get("start"),
                end_ts=validated_data.get("end"),
                format=validated_data["format"],
                indicators=validated_data["indicators"],
                user=validated_data.get("user"),
            )
        except DjangoValidationError as error:
            detail = error.message_dict if hasattr(error, "error_dict") else {"non_field_errors": error.messages}
            raise serializers.ValidationError(detail) from None


class ExportSerializer(serializers.ModelSerializer):
    status = serializers.CharField(source="task.status", help_text="pending, running, succeeded, failed, cancelled.")
    progress = serializers.FloatField(source="task.progress", help_text="Share written, 0 to 1.")
    message = serializers.CharField(source="task.message")
    error = serializers.CharField(source="task.error")
    finished_at = serializers.DateTimeField(source="task.finished_at", allow_null=True)
    start = serializers.IntegerField(source="start_ts", allow_null=True, help_text="UTC ms, inclusive.")
    end = serializers.IntegerField(source="end_ts", allow_null=True, help_text="UTC ms, inclusive.")
    download = serializers.SerializerMethodField(help_text="URL of the file once succeeded and until it expires.")

    class Meta:
        model = Export
        fields = [
            "id",
            "status",
            "progress",
            "message",
            "rows",
            "size",
            "error",
            "expires_at",
            "download",
            "exchange_id",
            "symbols",
            "timeframes",
            "start",
            "end",
            "format",
            "indicators",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.URI)
    def get_download(self, export: Export) -> str | None:
        if not export.file_path or export.is_expired():
            return None
        path = reverse("data-export-download", kwargs={"pk": export.pk})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class IndicatorComputeSerializer(serializers.Serializer):
    """Which stored series to rebuild the indicators of: one exchange, optionally some symbols and timeframes."""

    exchange_id = serializers.CharField(max_length=64)
    symbols = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, default=list, max_length=500
    )
    timeframes = serializers.ListField(
        child=serializers.CharField(max_length=8), required=False, default=list, max_length=20
    )
