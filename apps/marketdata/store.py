"""The series store: the one place that knows where candles and indicator rows live.

With `settings.MONGODB_URI` set, series live in MongoDB (mongostore.py: collections `candles` and
`indicators`); without it, in the Django database (sqlstore.py: the `Candle` and `IndicatorRow` tables;
SQLite by default, PostgreSQL in production and tests). The backend is chosen once, on first use, and
every call here hands the work to it; both modules implement the same functions. Everything else
(collection, indicators, gaps, charts, the API, the admin) calls this module, never a backend.

A candle is a ccxt row `[ts, open, high, low, close, volume]`; `ts` is the open time in UTC milliseconds.

What is stored is what the exchange sent. Rows are rejected only when they cannot be a candle at all:
a missing or non-integer `ts`, a value that is not a finite number (NaN, infinity, None, a string), or a
negative volume. Odd but real candles (high below low, open or close outside the high-low range, zero
volume, a `ts` off the timeframe grid) are stored unchanged: exchanges do publish such candles, and a
collector that "repairs" them silently would no longer be a faithful record. Those breaking an OHLC
invariant (see ohlc_anomalies) are flagged instead: an `Anomaly` row each, written by the same upsert
call, removed when a revision fixes the candle, counted in the series' statistics.

Each backend keeps per-series statistics (first and last ts, candles stored, anomalies, last collected)
current with every upsert and delete, one extra statement per batch at most (PostgreSQL folds it into the
batch's own statement), so coverage is read without counting candles.

Writes go in batches; each batch commits on its own, so a crash mid-call leaves whole batches behind and
re-running the same call is idempotent (upserts keyed on the natural key).
"""

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from numbers import Real
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
from django.conf import settings

from apps.marketdata import mongostore, sqlstore
from apps.marketdata.timeframes import (
    align_down,
    align_up,
    check_timeframe,
    grid_origin,
    is_calendar_timeframe,
    month_index,
    month_start,
    months_per_slot,
    timeframe_ms,
)

VALUE_FIELDS = ("open", "high", "low", "close", "volume")

# Rows fetched per query by iter_candles and iter_indicators: big enough to amortise the round trip,
# small enough that a stream of millions of rows holds only one chunk in memory.
ITER_CHUNK = 10_000
# Rows per chunk of iter_candle_columns: arrays of 100,000 candles are 5 MB. An export holds about ten
# times a chunk's arrays at its peak (the database's answer, the arrays, Arrow's copies and encoders, the
# next chunk read while one is written): 35-50 MB over the process's own at 100,000, 70-115 MB at 250,000,
# at the same speed (benchmarks/bench_export.py).
COLUMN_CHUNK = 100_000


class UpsertResult(NamedTuple):
    inserted: int
    updated: int
    unchanged: int

    @property
    def written(self) -> int:
        """Candles that changed the store (new or revised): what a run reports as written."""
        return self.inserted + self.updated

    def __add__(self, other: object) -> "UpsertResult":  # type: ignore[override]
        if not isinstance(other, UpsertResult):
            return NotImplemented
        return UpsertResult(*(a + b for a, b in zip(self, other, strict=True)))


class Coverage(NamedTuple):
    first_ts: int | None
    last_ts: int | None
    count: int


class SeriesStatistics(NamedTuple):
    """What the store keeps about one series, current with every write: no candle is counted to read it."""

    exchange_id: str
    symbol: str
    timeframe: str
    first_ts: int
    last_ts: int
    candles: int
    anomalies: int
    last_collected_at: datetime | None


class SeriesCoverage(NamedTuple):
    exchange_id: str
    symbol: str
    timeframe: str
    first_ts: int
    last_ts: int
    count: int


class InvalidCandleError(ValueError):
    """A row that cannot be stored as a candle; the message names the row, its ts and the field."""


# --- Input validation -------------------------------------------------------------------------------


def _check_series(exchange_id: str, symbol: str, timeframe: str) -> None:
    if not exchange_id or not isinstance(exchange_id, str):
        raise ValueError(f"exchange_id must be a non-empty string, got {exchange_id!r}")
    if not symbol or not isinstance(symbol, str):
        raise ValueError(f"symbol must be a non-empty string, got {symbol!r}")
    check_timeframe(timeframe)


def _number(value: Any) -> float | None:
    """The value as a float when it is a finite real number (bools are not numbers here), else None."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def normalize_candles(candles: Iterable[Sequence[Any]]) -> list[tuple[int, float, float, float, float, float]]:
    """Validate ccxt rows and return them as typed tuples, sorted by ts, one per ts (the last one wins).

    The whole input is checked before anything is written, so a bad row rejects the call, not half of it.
    Sorting also makes concurrent writers touch keys in the same order, which keeps PostgreSQL's row
    locks from deadlocking; deduplicating is required because one INSERT ... ON CONFLICT statement may
    not update the same row twice.
    """
    by_ts: dict[int, tuple[int, float, float, float, float, float]] = {}
    isfinite = math.isfinite
    for index, row in enumerate(candles):
        # Fast path for what ccxt returns (an int and five floats): this loop runs for every candle
        # ingested. A NaN or infinity anywhere makes the sum non-finite; so can an overflow of huge but
        # finite values, which the full checks below then accept.
        if type(row) is list and len(row) >= 6:
            ts, o, h, lo, c, v = row[0], row[1], row[2], row[3], row[4], row[5]
            if (
                type(ts) is int
                and ts >= 0
                and type(o) is float
                and type(h) is float
                and type(lo) is float
                and type(c) is float
                and type(v) is float
                and v >= 0
                and isfinite(o + h + lo + c + v)
            ):
                by_ts[ts] = (ts, o, h, lo, c, v)
                continue
        if isinstance(row, str | bytes) or not isinstance(row, Sequence) or len(row) < 6:
            raise InvalidCandleError(f"candle #{index} is not a row [ts, open, high, low, close, volume]: {row!r}")
        ts = row[0]
        if isinstance(ts, float) and ts.is_integer():
            ts = int(ts)
        if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
            raise InvalidCandleError(f"candle #{index}: ts must be a non-negative integer (UTC ms), got {ts!r}")
        values = []
        for name, raw in zip(VALUE_FIELDS, row[1:6], strict=True):
            number = _number(raw)
            if number is None:
                raise InvalidCandleError(f"candle #{index} (ts={ts}): {name} must be a finite number, got {raw!r}")
            values.append(number)
        if values[4] < 0:
            raise InvalidCandleError(f"candle #{index} (ts={ts}): volume must not be negative, got {values[4]!r}")
        by_ts[ts] = (ts, *values)  # type: ignore[assignment]
    return [by_ts[ts] for ts in sorted(by_ts)]


# Anomaly kinds, as Anomaly.Kind stores them.
HIGH_BELOW = "high_below"
LOW_ABOVE = "low_above"


def ohlc_anomalies(rows: list[tuple[int, float, float, float, float, float]]) -> list[tuple]:
    """(ts, kind, open, high, low, close) of the normalised rows that break an OHLC invariant: high below
    open, close or low (`high_below`); low above open or close (`low_above`). A candle may break both.

    Plain comparisons in one pass (about 40 ns a candle, against the microseconds each costs to store):
    the check runs on every candle ingested, and bad ones are rare.
    """
    flagged = []
    for ts, o, h, lo, c, _ in rows:
        if h < o or h < c or h < lo or lo > o or lo > c:
            if h < o or h < c or h < lo:
                flagged.append((ts, HIGH_BELOW, o, h, lo, c))
            if lo > o or lo > c:
                flagged.append((ts, LOW_ABOVE, o, h, lo, c))
    return flagged


# --- The backend ------------------------------------------------------------------------------------

# Errors meaning the series store cannot answer now, for the API to turn into a 503. Only MongoDB's: the
# SQL store is the Django database, whose outages the project handles as such (apps/jobs/outages.py).
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = mongostore.UNAVAILABLE_ERRORS

_backend: ModuleType | None = None


def _store() -> ModuleType:
    """The backend module, chosen on first use: MongoDB when MONGODB_URI is set (or a client injected)."""
    global _backend
    if _backend is None:
        _backend = mongostore if settings.MONGODB_URI or mongostore.client_injected() else sqlstore
    return _backend


def backend_name() -> str:
    """What the admin shows: "MongoDB" or "embedded (SQL)"."""
    return "MongoDB" if _store() is mongostore else "embedded (SQL)"


def set_mongo_client(client: Any) -> None:
    """Store series with this MongoDB client (e.g. `mongomock_ng.MongoClient()`), whatever MONGODB_URI says.

    Tests call this, and `reset_mongo_client()` afterwards.
    """
    global _backend
    mongostore.set_client(client)
    _backend = None


def reset_mongo_client() -> None:
    """Forget the MongoDB client and the backend choice: the next call chooses again from the settings."""
    global _backend
    mongostore.reset_client()
    _backend = None


# --- Candles ----------------------------------------------------------------------------------------


def upsert_candles(exchange_id: str, symbol: str, timeframe: str, candles: Iterable[Sequence[Any]]) -> UpsertResult:
    """Store ccxt rows: new ones are inserted, revised ones updated, identical ones left alone.

    Counts are of distinct ts values (a ts repeated in the input is stored once, the last row winning).
    Raises InvalidCandleError, before writing anything, when a row is not a storable candle.
    """
    _check_series(exchange_id, symbol, timeframe)
    rows = normalize_candles(candles)
    if not rows:
        return UpsertResult(0, 0, 0)
    flagged = ohlc_anomalies(rows)
    return UpsertResult(*_store().upsert_candles(exchange_id, symbol, timeframe, rows, flagged))


def delete_series(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> int:
    """Delete a series' candles (within the inclusive bounds, if given); returns how many were deleted.

    Their anomalies go with them and the series' statistics follow (a series left without candles has
    none). Indicator rows and gaps are not touched: see apps.marketdata.retention for a whole series.
    """
    return _store().delete_candles(exchange_id, symbol, timeframe, start_ts, end_ts)


# --- Statistics -------------------------------------------------------------------------------------


def series_statistics(
    exchange_id: str | None = None,
    symbol: str | None = None,
    timeframe: str | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> list[SeriesStatistics]:
    """Statistics of the series matching the (exact) filters, sorted by series, `limit` from `offset`."""
    filters = {"exchange_id": exchange_id, "symbol": symbol, "timeframe": timeframe}
    rows = _store().series_statistics({k: v for k, v in filters.items() if v is not None}, offset, limit)
    return [SeriesStatistics(*row) for row in rows]


def count_series_statistics(
    exchange_id: str | None = None, symbol: str | None = None, timeframe: str | None = None
) -> int:
    """How many series match the filters (series_statistics' total)."""
    filters = {"exchange_id": exchange_id, "symbol": symbol, "timeframe": timeframe}
    return _store().count_series_statistics({k: v for k, v in filters.items() if v is not None})


def statistics(exchange_id: str, symbol: str, timeframe: str) -> SeriesStatistics | None:
    """One series' statistics, or None when it stores no candle."""
    found = series_statistics(exchange_id, symbol, timeframe, limit=1)
    return found[0] if found else None


def rebuild_statistics() -> int:
    """Recompute every series' statistics and anomalies from the stored candles; returns the series count.

    A pass over every candle: for data stored before statistics existed, or after candles were written
    behind the store's back. Writes done by the store never need it.
    """
    return _store().rebuild_statistics(ohlc_anomalies)


def iter_chunks(
    read: Callable[[int | None, int], list], start_ts: int | None, limit: int | None, chunk_size: int
) -> Iterator:
    """Yield the rows `read(start_ts, size)` returns, chunk after chunk, each continuing after the last
    ts seen (row[0]): keyset paging on the unique index, so memory stays flat however long the range,
    and no server-side cursor or transaction is held open while a slow consumer takes its time."""
    remaining = limit
    next_start = start_ts
    while remaining is None or remaining > 0:
        size = chunk_size if remaining is None else min(chunk_size, remaining)
        chunk = read(next_start, size)
        yield from chunk
        if len(chunk) < size:
            return
        if remaining is not None:
            remaining -= len(chunk)
        next_start = chunk[-1][0] + 1


def read_candles(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    limit: int | None = None,
) -> list[list]:
    """Rows [ts, open, high, low, close, volume] in ascending ts, bounds inclusive, at most `limit` rows.

    For ranges that may be large, use iter_candles, which holds one chunk in memory at a time.
    """
    if limit is not None and limit <= 0:
        return []
    return _store().read_candles(exchange_id, symbol, timeframe, start_ts, end_ts, limit)


def iter_candles(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    limit: int | None = None,
    chunk_size: int = ITER_CHUNK,
) -> Iterator[list]:
    """Like read_candles, but yields rows one by one, fetching `chunk_size` at a time (see iter_chunks)."""
    return iter_chunks(
        lambda start, size: read_candles(exchange_id, symbol, timeframe, start, end_ts, size),
        start_ts,
        limit,
        chunk_size,
    )


def iter_candle_columns(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    chunk_size: int = COLUMN_CHUNK,
) -> Iterator[dict[str, np.ndarray]]:
    """The series' candles in the bounds (inclusive) as columns, chunk after chunk, ascending ts.

    Each chunk is a dict of numpy arrays of equal length, `ts` (int64, UTC ms) and `open`, `high`, `low`,
    `close`, `volume` (float64), at most `chunk_size` rows, never empty. For exports and other bulk
    readers: no Python object per candle, and one chunk in memory at a time.
    """
    _check_series(exchange_id, symbol, timeframe)
    return _store().iter_candle_columns(exchange_id, symbol, timeframe, start_ts, end_ts, chunk_size)


def read_closes(exchange_id: str, symbol: str, timeframe: str, start_ts: int) -> tuple[np.ndarray, np.ndarray]:
    """(ts, close) of the series' candles from `start_ts` on, as two arrays.

    Only the two columns are read: an indicator update reads a thousand or so candles each time and a
    recompute millions, where full candle rows would cost more than the computation.
    """
    return _store().read_closes(exchange_id, symbol, timeframe, start_ts)


def last_ts(exchange_id: str, symbol: str, timeframe: str) -> int | None:
    """Open time of the newest stored candle of the series, or None when it has none."""
    return _store().last_ts(exchange_id, symbol, timeframe)


def first_ts(exchange_id: str, symbol: str, timeframe: str) -> int | None:
    """Open time of the oldest stored candle of the series, or None when it has none."""
    return _store().first_ts(exchange_id, symbol, timeframe)


def coverage(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> Coverage:
    """First and last stored ts and the number of candles, of the series (within the bounds, if given).

    The count walks the series' part of the unique index: fine for one series, not for a dashboard
    refreshing every series every second.
    """
    return Coverage(*_store().coverage(exchange_id, symbol, timeframe, start_ts, end_ts))


def list_series() -> list[tuple[str, str, str]]:
    """Every stored series as (exchange_id, symbol, timeframe), sorted."""
    return [(s.exchange_id, s.symbol, s.timeframe) for s in list_series_coverage()]


def list_series_coverage() -> list[SeriesCoverage]:
    """Every stored series with its first and last ts and count, sorted by series.

    One pass over the whole candle index (there is no cheaper way to find the distinct series in either
    backend): meant for the admin and reports, not for a per-request path.
    """
    return [SeriesCoverage(*row) for row in _store().series_coverage()]


# --- Indicator rows ---------------------------------------------------------------------------------


def write_indicators(
    exchange_id: str, symbol: str, timeframe: str, ts: np.ndarray, columns: dict[str, np.ndarray]
) -> None:
    """Store one indicator row per ts whose values are exactly `columns` (NaN is null), keyed like candles.

    Rows that already hold exactly these values are left alone where the backend can tell cheaply (SQL
    compares packed bytes; MongoDB skips identical `$set`s itself).
    """
    _store().write_indicators(exchange_id, symbol, timeframe, ts, columns)


def read_indicators(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    limit: int | None = None,
) -> list[tuple[int, dict[str, float | None]]]:
    """Stored indicator rows (ts, values) in ascending ts, bounds inclusive, at most `limit` of them."""
    if limit is not None and limit <= 0:
        return []
    return _store().read_indicators(exchange_id, symbol, timeframe, start_ts, end_ts, limit)


def iter_indicators(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    limit: int | None = None,
    chunk_size: int = ITER_CHUNK,
) -> Iterator[tuple[int, dict[str, float | None]]]:
    """Like read_indicators, one chunk (a keyset-paged query) in memory at a time."""
    return iter_chunks(
        lambda start, size: read_indicators(exchange_id, symbol, timeframe, start, end_ts, size),
        start_ts,
        limit,
        chunk_size,
    )


def indicator_ts(exchange_id: str, symbol: str, timeframe: str) -> np.ndarray:
    """The ts of every stored indicator row of the series (unordered)."""
    return _store().indicator_ts(exchange_id, symbol, timeframe)


def delete_indicators(exchange_id: str, symbol: str, timeframe: str, ts: list[int]) -> None:
    """Delete the series' indicator rows at these ts, ITER_CHUNK keys per statement."""
    for start in range(0, len(ts), ITER_CHUNK):
        _store().delete_indicators(exchange_id, symbol, timeframe, ts[start : start + ITER_CHUNK])


def delete_indicator_range(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> int:
    """Delete the series' indicator rows within the inclusive bounds (all of them without); returns how many."""
    return _store().delete_indicator_range(exchange_id, symbol, timeframe, start_ts, end_ts)


# --- Gaps -------------------------------------------------------------------------------------------


def find_gaps(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> list[tuple[int, int]]:
    """Missing candle slots as inclusive (first_missing_ts, last_missing_ts) ranges, ascending.

    Slots run every timeframe from `start_ts` (default: the first stored candle) to `end_ts` (default:
    the last stored one), on the grid of the series' stored candles, so a bound between two slots is
    rounded inwards. A series with no candles at all uses the UTC epoch grid (Mondays for weeks), and
    without bounds it has no gaps.

    The holes between stored candles are found in the database (SQL: LAG() over the series' index; Mongo:
    $setWindowFields with $shift), and only the holes come back to Python.

    Months and years ("1M", "1y") are calendar slots: the 1st of each month (or January 1st) 00:00 UTC,
    the convention of ccxt and the exchanges. Those series are short (twelve candles a year), so they
    are compared with the calendar in Python. A candle off its grid (an exchange whose daily candles
    open at 08:00 UTC) does not break detection: the grid is taken from the stored candles.
    """
    _check_series(exchange_id, symbol, timeframe)
    if start_ts is not None and end_ts is not None and start_ts > end_ts:
        raise ValueError(f"start_ts {start_ts} is after end_ts {end_ts}")
    if is_calendar_timeframe(timeframe):
        return _calendar_gaps(exchange_id, symbol, timeframe, start_ts, end_ts)
    step = timeframe_ms(timeframe)
    stored = _store().bounds(exchange_id, symbol, timeframe, start_ts, end_ts)
    if stored is None:
        if start_ts is None or end_ts is None:
            return []
        stored_first = first_ts(exchange_id, symbol, timeframe)
        anchor = grid_origin(timeframe) if stored_first is None else stored_first
        first, last = align_up(start_ts, anchor, step), align_down(end_ts, anchor, step)
        return [(first, last)] if first <= last else []
    first, last = stored
    gaps: list[tuple[int, int]] = []
    if start_ts is not None:
        first_slot = align_up(start_ts, first, step)
        if first_slot < first:
            gaps.append((first_slot, first - step))
    gaps.extend(_store().holes(exchange_id, symbol, timeframe, first, last, step))
    if end_ts is not None:
        last_slot = align_down(end_ts, last, step)
        if last_slot > last:
            gaps.append((last + step, last_slot))
    return gaps


def _calendar_gaps(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> list[tuple[int, int]]:
    per_slot = months_per_slot(timeframe)
    stored = [row[0] for row in iter_candles(exchange_id, symbol, timeframe, start_ts, end_ts)]
    stored_months = {month_index(ts) for ts in stored}
    anchor = month_index(stored[0]) if stored else 0

    def slot_at_or_after(ts: int) -> int:
        index = month_index(ts)
        index = anchor + -((anchor - index) // per_slot) * per_slot
        return index if month_start(index) >= ts else index + per_slot

    def slot_at_or_before(ts: int) -> int:
        return anchor + ((month_index(ts) - anchor) // per_slot) * per_slot

    if not stored and (start_ts is None or end_ts is None):
        return []
    first = slot_at_or_after(start_ts) if start_ts is not None else month_index(stored[0])
    last = slot_at_or_before(end_ts) if end_ts is not None else month_index(stored[-1])
    gaps: list[tuple[int, int]] = []
    run_start: int | None = None
    for index in range(first, last + 1, per_slot):
        if index not in stored_months:
            run_start = index if run_start is None else run_start
            continue
        if run_start is not None:
            gaps.append((month_start(run_start), month_start(index - per_slot)))
            run_start = None
    if run_start is not None:
        gaps.append((month_start(run_start), month_start(last)))
    return gaps
