"""Exports: stored candles (and indicators) written to CSV, JSON Lines, Parquet or freqtrade's layout.

An `Export` row says what to write; `write_export` writes it under settings.EXPORT_DIR/<id>/, reading
each series through the store in column chunks (store.iter_candle_columns) and writing each chunk as
it comes, so memory stays flat whatever the range. One series gives one file; several give a zip of one
file per series. `request_export` validates and queues an export (the API and `manage.py export` share
it); `run_export_task` is the background handler (`apps.jobs.tasks.HANDLERS`).

Formats (every one has `ts`, the candle open time, and float64 open, high, low, close, volume, then one
column per indicator when asked):
- parquet: `ts` as timestamp(ms, UTC), one row group per chunk of candles, zstd-compressed.
- csv: `ts` (epoch ms), `time` (ISO 8601 UTC), the values, as the API's `?format=csv`; each float as the
  shortest text that reads back to the same float; an empty field for a missing value.
- json: JSON Lines, one object per candle with the same keys as the CSV columns; null for a missing value.
- freqtrade: freqtrade's own data directory, a zip of `<exchange>/<PAIR>-<timeframe>.feather` (futures,
  the symbols with a settle currency: `<exchange>/futures/<PAIR>-<timeframe>-futures.feather`), exactly
  the columns date, open, high, low, close, volume (date a timestamp(ms, UTC)), LZ4-compressed Arrow
  files as freqtrade's FeatherDataHandler writes and reads them. Indicators are not part of it.
"""

import io
import logging
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.connectors.models import validate_exchange_id
from apps.jobs.models import Job, Task, validate_symbol
from apps.marketdata import store
from apps.marketdata.indicators import indicator_set
from apps.marketdata.models import Export
from apps.marketdata.timeframes import is_valid_timeframe, slot_count, timeframe_error

logger = logging.getLogger(__name__)

FORMATS = tuple(Export.Format.values)
EXTENSIONS = {"csv": "csv", "json": "jsonl", "parquet": "parquet", "freqtrade": "feather"}
MEDIA_TYPES = {
    "csv": "text/csv",
    "json": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
    "zip": "application/zip",
}
MAX_SERIES = 200
VALUE_FIELDS = ("open", "high", "low", "close", "volume")
TS_TYPE = pa.timestamp("ms", tz="UTC")
# How often an idle run_scheduler process deletes expired exports' files (besides each export task): one
# indexed query that finds nothing on most sweeps.
SWEEP_EVERY_SECONDS = 300


# --- Validation -------------------------------------------------------------------------------------


def validate_export(
    exchange_id: str,
    symbols: list[str],
    timeframes: list[str],
    start_ts: int | None,
    end_ts: int | None,
    format: str,
    indicators: bool,
) -> None:
    """Raise ValidationError({field: message}) unless this export can be made; the API's 400s and the
    command's errors come from here. A symbol or timeframe is known when a job collects it or the store
    holds candles of it; a range with no candles is fine (the export has zero rows)."""
    errors: dict[str, str] = {}
    if format not in FORMATS:
        errors["format"] = f"format {format!r} is not offered: use {', '.join(FORMATS)}."
    try:
        validate_exchange_id(exchange_id)
    except ValidationError as exc:
        errors["exchange_id"] = exc.messages[0]
    if not symbols:
        errors["symbols"] = "Give at least one symbol, e.g. BTC/USDT."
    if not timeframes:
        errors["timeframes"] = "Give at least one timeframe, e.g. 1m."
    for symbol in symbols:
        try:
            validate_symbol(symbol)
        except ValidationError as exc:
            errors.setdefault("symbols", exc.messages[0])
    bad_timeframes = [timeframe for timeframe in timeframes if not is_valid_timeframe(timeframe)]
    if bad_timeframes:
        errors["timeframes"] = timeframe_error(bad_timeframes[0])
    if len(symbols) * len(timeframes) > MAX_SERIES:
        errors["symbols"] = f"At most {MAX_SERIES} series (symbols x timeframes) per export."
    if start_ts is not None and end_ts is not None and start_ts > end_ts:
        errors["start"] = "start is after end."
    if indicators and format == Export.Format.FREQTRADE:
        errors["indicators"] = (
            "freqtrade's data files hold exactly date, open, high, low, close, volume (its data handlers "
            "refuse other columns; freqtrade computes indicators itself): export with indicators false."
        )
    if errors:
        raise ValidationError(errors)
    known = _known_series(exchange_id, symbols, timeframes)
    unknown_symbols = [symbol for symbol in symbols if not any((symbol, tf) in known for tf in timeframes)]
    if unknown_symbols:
        errors["symbols"] = (
            f"No series of {', '.join(map(repr, unknown_symbols))} on {exchange_id} in timeframes "
            f"{', '.join(timeframes)}: neither collected by a job nor stored."
        )
    unknown_timeframes = [tf for tf in timeframes if not any((symbol, tf) in known for symbol in symbols)]
    if unknown_timeframes and not unknown_symbols:
        errors["timeframes"] = (
            f"No series in timeframe {', '.join(map(repr, unknown_timeframes))} of {', '.join(symbols)} on "
            f"{exchange_id}: neither collected by a job nor stored."
        )
    if errors:
        raise ValidationError(errors)
    estimate = estimate_rows(exchange_id, symbols, timeframes, start_ts, end_ts)
    if estimate > settings.EXPORT_MAX_ROWS:
        raise ValidationError(
            f"The range may hold up to {estimate:,} candles; an export holds at most {settings.EXPORT_MAX_ROWS:,} "
            "(EXPORT_MAX_ROWS): narrow start and end, or export fewer series at a time."
        )


def _stored_bounds(exchange_id: str, symbols: list[str], timeframes: list[str]) -> dict[tuple[str, str], tuple]:
    """(symbol, timeframe) -> (first ts, last ts) of the selected series that hold candles: one read of
    the exchange's series statistics."""
    return {
        (stats.symbol, stats.timeframe): (stats.first_ts, stats.last_ts)
        for stats in store.series_statistics(exchange_id=exchange_id)
        if stats.symbol in symbols and stats.timeframe in timeframes
    }


def _known_series(exchange_id: str, symbols: list[str], timeframes: list[str]) -> set[tuple[str, str]]:
    collected = set(
        Job.objects.filter(connector__exchange_id=exchange_id, symbol__in=symbols, timeframe__in=timeframes)
        .values_list("symbol", "timeframe")
        .distinct()
    )
    return collected | set(_stored_bounds(exchange_id, symbols, timeframes))


def estimate_rows(
    exchange_id: str, symbols: list[str], timeframes: list[str], start_ts: int | None, end_ts: int | None
) -> int:
    """Slots between each series' stored bounds clipped to the range: an upper bound of the candles there
    (counting would walk the range)."""
    total = 0
    for (_, timeframe), (first, last) in _stored_bounds(exchange_id, symbols, timeframes).items():
        low = first if start_ts is None else max(first, start_ts)
        high = last if end_ts is None else min(last, end_ts)
        total += slot_count(timeframe, low, high) if low <= high else 0
    return total


# --- Requests ---------------------------------------------------------------------------------------


def request_export(
    *,
    exchange_id: str,
    symbols: list[str],
    timeframes: list[str],
    start_ts: int | None = None,
    end_ts: int | None = None,
    format: str,
    indicators: bool = False,
    user=None,
) -> Export:
    """Validate (ValidationError naming the field) and queue an export; a scheduler worker writes it."""
    validate_export(exchange_id, symbols, timeframes, start_ts, end_ts, format, indicators)
    with transaction.atomic():
        task = Task.objects.enqueue(Task.Kind.EXPORT, {}, user=user)
        export = Export.objects.create(
            task=task,
            exchange_id=exchange_id,
            symbols=list(symbols),
            timeframes=list(timeframes),
            start_ts=start_ts,
            end_ts=end_ts,
            format=format,
            indicators=indicators,
            created_by=user,
        )
        task.params = {"export_id": export.pk}
        task.save(update_fields=["params"])
    return export


def run_export_task(task: Task, progress: Callable[[float, str], None] | None = None) -> dict:
    """The handler of export tasks: delete expired exports' files, then write this one. `progress(share,
    message)` is told too, beside the task (manage.py export's bar)."""
    delete_expired_files()
    export = Export.objects.get(task=task)

    def report(share: float, message: str) -> None:
        task.report(share, message)
        if progress is not None:
            progress(share, message)

    write_export(export, report)
    return {"export_id": export.pk, "rows": export.rows, "size": export.size, "file": export.file_path}


def delete_expired_files(now=None) -> int:
    """Delete the files of expired exports (one indexed query when there are none); returns how many."""
    deleted = 0
    for export in Export.objects.expired(now):
        shutil.rmtree(export_dir(export), ignore_errors=True)
        Export.objects.filter(pk=export.pk).update(file_path="")
        deleted += 1
    if deleted:
        logger.info("deleted %s expired export files", deleted, extra={"deleted": deleted})
    return deleted


# --- Writing ----------------------------------------------------------------------------------------


def export_dir(export: Export) -> Path:
    return Path(settings.EXPORT_DIR) / str(export.pk)


def export_path(export: Export) -> Path | None:
    return Path(settings.EXPORT_DIR) / export.file_path if export.file_path else None


def safe_name(text: str) -> str:
    """`text` fit for a file name the way freqtrade names pairs (BTC/USDT:USDT -> BTC_USDT_USDT)."""
    for char in "/ .@$+:\\":
        text = text.replace(char, "_")
    return text


def freqtrade_name(exchange_id: str, symbol: str, timeframe: str) -> str:
    """Where freqtrade looks for a pair's candles in `--datadir` (its IDataHandler._pair_data_filename):
    spot `<PAIR>-<tf>.feather`; futures (a settle currency) `futures/<PAIR>-<tf>-futures.feather`; a
    month is written `1Mo` (case-insensitive file systems)."""
    timeframe = timeframe.replace("M", "Mo")
    if ":" in symbol:
        return f"{exchange_id}/futures/{safe_name(symbol)}-{timeframe}-futures.feather"
    return f"{exchange_id}/{safe_name(symbol)}-{timeframe}.feather"


def member_name(export: Export, symbol: str, timeframe: str) -> str:
    if export.format == Export.Format.FREQTRADE:
        return freqtrade_name(export.exchange_id, symbol, timeframe)
    return f"{safe_name(export.exchange_id)}_{safe_name(symbol)}_{timeframe}.{EXTENSIONS[export.format]}"


@dataclass
class Progress:
    """Counts written candles against the estimate and reports a share (never 1 before the end)."""

    total: int
    report: Callable[[float, str], None]
    rows: int = 0

    def add(self, rows: int, message: str) -> None:
        self.rows += rows
        self.report(min(0.99, self.rows / self.total) if self.total else 0.0, message)


def write_export(export: Export, report: Callable[[float, str], None] = lambda share, message: None) -> Export:
    """Write the export's file(s), record rows, size, path and expiry on it; returns it.

    Written under a temporary name and renamed when complete, so a file on disk is always whole. `report`
    gets the share done (0 to 1) and a message as chunks are written.
    """
    series = [(symbol, timeframe) for symbol in export.symbols for timeframe in export.timeframes]
    columns = indicator_set().names if export.indicators else []
    progress = Progress(
        estimate_rows(export.exchange_id, export.symbols, export.timeframes, export.start_ts, export.end_ts), report
    )
    directory = export_dir(export)
    shutil.rmtree(directory, ignore_errors=True)  # what an earlier, abandoned attempt left
    directory.mkdir(parents=True, exist_ok=True)
    single = len(series) == 1 and export.format != Export.Format.FREQTRADE
    if single:
        name = member_name(export, *series[0])
        partial = directory / f".{name}.partial"
        chunks = series_tables(export.exchange_id, *series[0], export.start_ts, export.end_ts, columns)
        with partial.open("wb") as sink:
            _write_series(export, *series[0], columns, chunks, sink, progress)
    else:
        name = f"export-{export.pk}.zip"
        partial = directory / f".{name}.partial"
        compression = zipfile.ZIP_DEFLATED if export.format in ("csv", "json") else zipfile.ZIP_STORED
        with zipfile.ZipFile(partial, "w", compression=compression, compresslevel=1) as archive:
            for symbol, timeframe in series:
                chunks = series_tables(export.exchange_id, symbol, timeframe, export.start_ts, export.end_ts, columns)
                first = next(chunks, None)
                if first is None:
                    continue  # a series without candles in the range has no file in the zip
                with archive.open(member_name(export, symbol, timeframe), "w", force_zip64=True) as sink:
                    _write_series(export, symbol, timeframe, columns, chain([first], chunks), sink, progress)
    final = directory / name
    partial.rename(final)
    export.rows = progress.rows
    export.size = final.stat().st_size
    export.file_path = str(final.relative_to(settings.EXPORT_DIR))
    export.expires_at = timezone.now() + timedelta(hours=settings.EXPORT_TTL_HOURS)
    export.save(update_fields=["rows", "size", "file_path", "expires_at"])
    return export


def _write_series(
    export: Export,
    symbol: str,
    timeframe: str,
    columns: list[str],
    chunks: Iterable[pa.Table],
    sink: IO[bytes],
    progress: Progress,
) -> None:
    message = f"{symbol} {timeframe}"
    writer = WRITERS[export.format]
    # A thread writes a chunk while this one reads the next: PostgreSQL (or MongoDB) prepares the next
    # chunk while pyarrow encodes and compresses this one, both releasing the GIL. The database work stays
    # in this thread, on its connection (and transaction); at most two chunks are in memory.
    with writer(sink, series_schema(columns, export.format)) as write, ThreadPoolExecutor(1) as pool:
        pending: Future | None = None
        for table in chunks:
            if pending is not None:
                pending.result()
            pending = pool.submit(write, table)
            progress.add(table.num_rows, message)
        if pending is not None:
            pending.result()


def series_schema(columns: list[str], format: str = "parquet") -> pa.Schema:
    time_name = "date" if format == Export.Format.FREQTRADE else "ts"
    return pa.schema(
        [pa.field(time_name, TS_TYPE, nullable=False)]
        + [pa.field(name, pa.float64(), nullable=False) for name in VALUE_FIELDS]
        + [pa.field(name, pa.float64()) for name in columns]
    )


def series_tables(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None,
    end_ts: int | None,
    columns: list[str],
    chunk_size: int | None = None,
) -> Iterator[pa.Table]:
    """The series as Arrow tables, one per store chunk (`chunk_size`, default store.COLUMN_CHUNK): `ts`
    (timestamp ms UTC), the values, the indicator `columns` (null where no indicator row or value is
    stored)."""
    schema = series_schema(columns)
    chunk_size = chunk_size or store.COLUMN_CHUNK
    for chunk in store.iter_candle_columns(exchange_id, symbol, timeframe, start_ts, end_ts, chunk_size):
        arrays: list[pa.Array] = [pa.array(chunk["ts"]).cast(TS_TYPE)]
        arrays += [pa.array(chunk[name]) for name in VALUE_FIELDS]
        if columns:
            arrays += _indicator_arrays(exchange_id, symbol, timeframe, chunk["ts"], columns)
        yield pa.Table.from_arrays(arrays, schema=schema)


def _indicator_arrays(exchange_id: str, symbol: str, timeframe: str, ts: np.ndarray, columns: list[str]) -> list:
    values = {name: np.full(len(ts), np.nan) for name in columns}
    for row_ts, row in store.iter_indicators(exchange_id, symbol, timeframe, int(ts[0]), int(ts[-1])):
        index = np.searchsorted(ts, row_ts)
        if index < len(ts) and ts[index] == row_ts:
            for name in columns:
                value = row.get(name)
                if value is not None:
                    values[name][index] = value
    return [pa.array(values[name], from_pandas=True) for name in columns]  # NaN -> null


class _Chunks(io.RawIOBase):
    """A write-only stream that keeps what is written until `take()`: a Parquet file handed out piece by
    piece as its row groups are written, for a streamed HTTP response."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        self.position += len(self.parts[-1])
        return len(self.parts[-1])

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def parquet_stream(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None, limit: int | None = None
) -> Iterator[bytes]:
    """One series as a Parquet file (the export's schema, no indicators), in pieces: a row group per
    chunk, the first piece once the first chunk is read (so a store error surfaces before any byte),
    at most `limit` candles. Memory holds one chunk whatever the range (`GET /data/ohlcv?format=parquet`)."""
    sink = _Chunks()
    left = limit
    with parquet_writer(sink, series_schema([])) as write:
        for table in series_tables(exchange_id, symbol, timeframe, start_ts, end_ts, []):
            if left is not None:
                table, left = table.slice(0, left), left - min(left, table.num_rows)
            if table.num_rows:
                write(table)
                yield sink.take()
            if left == 0:
                break
    yield sink.take()


# --- Writers: one per format, each a context manager yielding write(table) ---------------------------


@contextmanager
def parquet_writer(sink: IO[bytes], schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
    # No dictionary encoding: prices are nearly all distinct, so building dictionaries only to drop them
    # cost five times the CPU of the rest of the write, and made a larger file. `ts` grows by a steady
    # step, which delta encoding stores in a few bits per candle.
    with pq.ParquetWriter(
        sink, schema, compression="zstd", use_dictionary=False, column_encoding={schema.names[0]: "DELTA_BINARY_PACKED"}
    ) as writer:
        # One row group per chunk: readers can skip by ts statistics, and memory holds one chunk.
        yield lambda table: writer.write_table(table, row_group_size=max(1, table.num_rows))


# --- Text formats: CSV and JSON Lines, spliced from columns of text -----------------------------------
#
# Arrow's CSV writer formats a float in about 100 ns (double-conversion), which made a CSV export cost six
# times the CPU of a Parquet one. orjson formats a numpy column four times faster, as the same shortest
# text that reads back to the same float (Python's repr, the API's JSON). Each column (or block of
# columns) is one orjson call; its separators are turned into the bytes that lead each row's text, so the
# rows are cut out of orjson's output by offsets alone, without copying a value. One Arrow kernel
# (binary_join_element_wise) then splices the columns into lines, whose bytes go to the file as they are.

_COMMA = ord(",")
TEXT_SLICE = 16_384  # candles formatted at a time
WRITE_PIECE = 262_144  # bytes of text per write to the file
_DAY = 86_400_000
# ISO 8601 has four-digit years: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z in epoch ms.
_FIRST_ISO_TS, _LAST_ISO_TS = -62_135_596_800_000, 253_402_300_799_999


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers as `width` ASCII digits each, zero-padded: a (len(values), width) uint8 array."""
    out = np.empty((len(values), width), dtype=np.uint8)
    for place in range(width - 1, -1, -1):
        values, out[:, place] = np.divmod(values, 10)
    return out + ord("0")


def _clock_table() -> np.ndarray:
    """The text HH:MM:SS of each second of a day, 8 bytes each, as uint64 so that a lookup copies one word."""
    seconds = np.arange(86_400)
    text = np.full((86_400, 8), ord(":"), dtype=np.uint8)
    text[:, 0:2], text[:, 3:5], text[:, 6:8] = (
        _digits(seconds // 3600, 2),
        _digits(seconds // 60 % 60, 2),
        _digits(seconds % 60, 2),
    )
    return text.view(np.uint64).ravel()


_CLOCK = _clock_table()


def _dates(days: np.ndarray) -> np.ndarray:
    """The text YYYY-MM-DD of days since 1970-01-01 (years 1 to 9999) as a (len(days), 10) uint8 array: the
    proleptic Gregorian calendar in integer arithmetic (Howard Hinnant's civil_from_days)."""
    z = days + 719_468
    era = z // 146_097
    day_of_era = z - era * 146_097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153  # March is 0, so that February's 29th day comes last
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = np.where(shifted_month < 10, shifted_month + 3, shifted_month - 9)
    year = year_of_era + era * 400 + (month <= 2)
    text = np.full((len(days), 10), ord("-"), dtype=np.uint8)
    text[:, 0:4], text[:, 5:7], text[:, 8:10] = _digits(year, 4), _digits(month, 2), _digits(day, 2)
    return text


def _fixed_width_text(rows: np.ndarray) -> pa.StringArray:
    """A (n, width) uint8 array as n strings, without a copy."""
    count, width = rows.shape
    offsets = np.arange(0, (count + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(rows)))


def iso_times(ts: np.ndarray, before: bytes = b"", after: bytes = b"") -> pa.StringArray:
    """ISO 8601 UTC text of epoch-ms `ts`, "2024-01-01T00:00:00Z", as the API shows it, with milliseconds
    (".500") in every row when any of `ts` has them. `before` and `after` frame each text."""
    whole_seconds = not np.any(ts % 1000)
    if len(ts) == 0 or ts.min() < _FIRST_ISO_TS or ts.max() > _LAST_ISO_TS:
        # Beyond four-digit years, Arrow's own text of the timestamp.
        naive = pa.array(ts).cast(pa.timestamp("ms")).cast(pa.timestamp("s" if whole_seconds else "ms"))
        naive = naive.cast(pa.string())
        return pc.binary_join_element_wise(
            before.decode(), pc.replace_substring(naive, " ", "T"), "Z" + after.decode(), ""
        )
    days = ts // _DAY
    day_starts = np.flatnonzero(np.diff(days, prepend=days[0] - 1))
    width = len(before) + (20 if whole_seconds else 24) + len(after)
    text = np.empty((len(ts), width), dtype=np.uint8)
    text[:, : len(before)] = np.frombuffer(before, dtype=np.uint8)
    at = len(before)
    # A chunk of candles spans few days: the calendar is worked out once per day, the clock looked up.
    text[:, at : at + 10] = np.repeat(_dates(days[day_starts]), np.diff(day_starts, append=len(ts)), axis=0)
    text[:, at + 10] = ord("T")
    millis = ts - days * _DAY
    text[:, at + 11 : at + 19] = _CLOCK[millis // 1000].view(np.uint8).reshape(-1, 8)
    at += 19
    if not whole_seconds:
        text[:, at] = ord(".")
        text[:, at + 1 : at + 4] = _digits(millis % 1000, 3)
        at += 4
    text[:, at] = ord("Z")
    text[:, at + 1 :] = np.frombuffer(after, dtype=np.uint8)
    return _fixed_width_text(text)


def _number_rows(values: np.ndarray, lead: bytes, null: bytes = b"null") -> pa.StringArray:
    """Each row of `values` (n numbers, or an (n, k) C-contiguous array) as its numbers' text joined by
    commas, led by `lead` (one byte): one orjson call, whose output is cut into rows where its separators
    were. Floats are the shortest text that reads back to the same float; NaN is `null`."""
    per_row = 1 if values.ndim == 1 else values.shape[1]
    data = orjson.dumps(values.reshape(-1), option=orjson.OPT_SERIALIZE_NUMPY)  # "[a,b,...]"
    if null != b"null" and values.dtype.kind == "f" and np.isnan(values).any():
        data = data.replace(b"null", null)
    text = bytearray(data)
    marks = np.frombuffer(text, dtype=np.uint8)
    row_starts = np.flatnonzero(marks == _COMMA)[per_row - 1 :: per_row]  # the separator before each row
    marks[0] = marks[row_starts] = ord(lead)
    offsets = np.empty(len(values) + 1, dtype=np.int32)
    offsets[0], offsets[1:-1], offsets[-1] = 0, row_starts, len(text) - 1  # the closing "]" left out
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(text))


def _arrow_number_rows(values: np.ndarray) -> pa.StringArray:
    """Each row as "," and its numbers' text joined by commas, by Arrow (infinity is "inf"; NaN empty)."""
    columns = [
        pc.fill_null(pa.array(values[:, j], from_pandas=True).cast(pa.string()), "") for j in range(values.shape[1])
    ]
    return pc.binary_join_element_wise("", *columns, ",")


def _table_values(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's ts (epoch ms) and its values (an (n, k) float64 array, NaN where null)."""
    values = np.empty((table.num_rows, table.num_columns - 1))
    for j, column in enumerate(table.columns[1:]):
        values[:, j] = column.to_numpy()
    return table.column(0).cast(pa.int64()).to_numpy(), values


def _text_bytes(lines: pa.StringArray) -> memoryview:
    """The concatenated text of a fresh string array (offset 0), without a copy."""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1)
    return memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]]


def csv_lines(table: pa.Table) -> memoryview:
    """A chunk as CSV text, each line led by its newline: `ts`, the quoted ISO time, the values (as the
    API's CSV). NaN or null is an empty field; infinity (never in a candle) is "inf"."""
    ts, values = _table_values(table)
    rows = _arrow_number_rows(values) if np.isinf(values).any() else _number_rows(values, b",", null=b"")
    lines = pc.binary_join_element_wise(_number_rows(ts, b"\n"), iso_times(ts, b',"', b'"'), rows, "")
    return _text_bytes(lines)


def json_lines(table: pa.Table, names: list[str]) -> memoryview:
    """A chunk as JSON Lines: one object per candle with the CSV's columns as keys (`names`); NaN, null
    and infinity are null."""
    ts = table.column(0).cast(pa.int64()).to_numpy()
    keys = [orjson.dumps(name).decode() for name in names]
    parts: list[Any] = ["{" + keys[0], _number_rows(ts, b":"), f",{keys[1]}:", iso_times(ts, b'"', b'"')]
    for key, column in zip(keys[2:], table.columns[1:], strict=True):
        parts += ["," + key, _number_rows(column.to_numpy(), b":")]
    return _text_bytes(pc.binary_join_element_wise(*parts, "}\n", ""))


def _write_text(sink: IO[bytes], table: pa.Table, lines: Callable[[pa.Table], memoryview]) -> None:
    # A slice's temporary buffers (a few MB) are reused by the allocator, where a whole chunk's were fresh
    # memory every time, whose page faults cost half as much CPU as the formatting itself. Its text goes
    # to the file in pieces: the kernel spent about twice the CPU on the same bytes written 1.8 MB at a time
    # (benchmarks/bench_export.py, a 1 GB CSV on a 2-core VM).
    for start in range(0, table.num_rows, TEXT_SLICE):
        text = lines(table.slice(start, TEXT_SLICE))
        for at in range(0, len(text), WRITE_PIECE):
            sink.write(text[at : at + WRITE_PIECE])


def text_names(schema: pa.Schema) -> list[str]:
    """The columns of the text formats: `ts` in epoch ms, `time` in ISO 8601, then the rest of `schema`."""
    return ["ts", "time", *schema.names[1:]]


@contextmanager
def csv_writer(sink: IO[bytes], schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
    sink.write(",".join('"{}"'.format(name.replace('"', '""')) for name in text_names(schema)).encode())
    yield lambda table: _write_text(sink, table, csv_lines)
    sink.write(b"\n")  # each line brings the newline before it; the last one ends here


@contextmanager
def json_writer(sink: IO[bytes], schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
    names = text_names(schema)
    yield lambda table: _write_text(sink, table, lambda piece: json_lines(piece, names))


@contextmanager
def feather_writer(sink: IO[bytes], schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
    # Feather V2 is the Arrow IPC file format; LZ4 as freqtrade's own files (pandas.to_feather there).
    options = pa_ipc.IpcWriteOptions(compression="lz4")
    with pa_ipc.new_file(sink, schema, options=options) as writer:
        yield lambda table: writer.write_table(table.rename_columns(schema.names))


WRITERS: dict[str, Callable[[IO[bytes], pa.Schema], Any]] = {
    "parquet": parquet_writer,
    "csv": csv_writer,
    "json": json_writer,
    "freqtrade": feather_writer,
}


def media_type(export: Export) -> str:
    if export.file_path.endswith(".zip"):
        return MEDIA_TYPES["zip"]
    return MEDIA_TYPES.get(export.format, "application/octet-stream")
