"""Indicators (SMA, EMA, RSI, MACD, Bollinger Bands) computed with `ta` after each collection.

The set comes from `get_config().indicators`; every configured period becomes columns of one row per
candle, keyed like the candle (exchange_id, symbol, timeframe, ts):

    sma_<n>, ema_<n>, rsi_<n>
    macd, macd_signal, macd_hist                    MACD 12/26/9
    macd_<f>_<s>_<g>, macd_signal_<f>_<s>_<g>, ...   any other MACD
    bb_upper, bb_middle, bb_lower                   Bollinger 20/2
    bb_upper_<n>_<k>, ...                           any other; a fractional k is written with "p" for
                                                    the point (bb_upper_10_1p5), because MongoDB field
                                                    names must not contain dots.

Correctness. `ta` seeds its exponential averages with the first value of the series (EMA, MACD) or
with zero (RSI's Wilder averages), where the textbook definition (Wilder; TA-Lib) seeds them with the
simple average of the first n values. The two differ by a seed error that afterwards decays like
(1 - alpha)^k. A value is stored only from the first index where that error is provably below
EPSILON (1e-10, two orders under the 1e-8 promise, one under the 1e-9 incremental one) given a
generous bound on the seed error: PRICE_SEED_BOUND times the close for price-like values, and
RSI_SEED_BOUND points for RSI (100 points times 100 for a drop in volatility after the seed).
Before that index the column is null, never 0 or NaN. In practice (first stored 0-based index):

    SMA, Bollinger   n-1, the first full window (ta and the textbook agree exactly)
    EMA n            n-1 + ln(B/eps)/-ln(1-2/(n+1)), ~13x n (EMA 12: 163, EMA 26: 355, EMA 50: 683)
    MACD f/s/g       the line like the slow EMA; signal and histogram a little later, because the
                     signal averages the converging line (MACD 12/26/9: 364 and 420)
    RSI n            after n + ln(B/eps)/-ln(1-1/n) price changes, ~32x n (RSI 14: 449 when every
                     candle moves)

Measured against TA-Lib (tests/marketdata/test_indicators.py), raw `ta` output reaches 1e-8 at
roughly 60% of these indices on random walks and real prices: the margin is what covers series whose
seed error is larger than usual (a crash after the first candles, a volatile listing).

RSI counts price changes, not candles: in a flat stretch Wilder's averages shrink at the same rate,
so their ratio (the RSI) and the relative seed error stay exactly where they were. For the same reason
a flat stretch holds the RSI at its last value (computed that way here, so ten thousand flat candles
cannot underflow the averages into 0/0). Before a series has moved at all, gains and losses are both
zero: the RSI is 50 by convention here, the neutral value (TA-Lib says 0 and `ta` says 100 for that
0/0; neither is a measurement). If the first n changes of a series are all zero the seed is exact and
the RSI is stored from index n. Bollinger Bands of a flat window are the price itself (std 0).

Incremental. An update from `from_ts` reads enough history before it (`IndicatorSet.warmup`, plus,
for RSI, enough price changes) that `ta` restarted there agrees with the full recompute to 1e-10,
recomputes to the end of the series (every EMA value after a revised candle changes) and stores rows
from `from_ts` on. When the history before `from_ts` is shorter than the warm-up, the window starts
at the series start, so the null prefix is always counted from the series start.

Storage. MongoDB documents carry `values` as a mapping. The SQL table (IndicatorRow) packs them as
float64 bytes beside the column names. A write first reads the stored rows of its range and compares
bytes: new rows are INSERTed, changed rows upserted, identical rows left alone. A plain append of
candles writes only the new rows, a repeated update nothing, and a revision only the rows from the
revised candle on. (Values computed from different windows agree to 1e-10, not to the bit, so a
recompute does rewrite rows an incremental update wrote.) On PostgreSQL an update of 1,000 candles
costs about 10 ms, write included (benchmarks/bench_indicators.py).
"""

import contextlib
import dataclasses
import functools
import math
import struct
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import psycopg
import psycopg.adapt
import psycopg.errors
import psycopg.pq
from django.db import connection, transaction
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError
from ta.momentum import RSIIndicator
from ta.trend import MACD, EMAIndicator, SMAIndicator
from ta.volatility import BollingerBands

from apps.marketdata import store
from apps.marketdata.models import Candle, IndicatorRow, unpack_values
from apps.marketdata.timeframes import timeframe_ms
from datacollector.config import BollingerConfig, ConfigError, IndicatorConfig, MacdConfig, get_config

EPSILON = 1e-10
PRICE_SEED_BOUND = 10.0
RSI_SEED_BOUND = 1e4

# Rows per write: the SQL store compares a batch with the stored rows and sends it as two arrays
# (PostgreSQL), MongoDB as one bulk message (kept well under its 48 MB cap), the ORM fallback as
# multi-row INSERTs of SQL_BATCH rows (SQLite allows 32,766 parameters per statement).
SQL_WRITE_BATCH = 5_000
MONGO_BATCH = 1_000
SQL_BATCH = 500

DEFAULT_MACD = MacdConfig()
DEFAULT_BOLLINGER = BollingerConfig()


def decay_horizon(alpha: float, bound: float, epsilon: float = EPSILON) -> int:
    """Steps k after which a seed error of at most `bound` has decayed below `epsilon`: (1-alpha)^k * bound."""
    return math.ceil(math.log(bound / epsilon) / -math.log1p(-alpha))


def _signal_horizon(macd: MacdConfig, epsilon: float = EPSILON) -> int:
    """Steps after the slow EMA's seed until the MACD signal's error is below `epsilon`.

    The signal is an EMA (rate a) of the MACD line, so its error is its own seed error decaying like
    (1-a)^k plus the line's seed error filtered through it: sum_j a (1-a)^j e(k-j) with
    e(i) <= 2B r_slow^i, which is at most a (k+1) 2B r^k for r the slower of the two rates. The bound
    is not monotone at first (the (k+1) factor), so the horizon starts past its peak.
    """
    bound = 2 * PRICE_SEED_BOUND
    a = _ema_alpha(macd.signal)
    r = max(1 - _ema_alpha(macd.slow), 1 - a)
    k = math.ceil(-1 / math.log(r))
    while bound * (a * (k + 1) * r**k + (1 - a) ** k) >= epsilon:
        k += 1
    return k


def _ema_alpha(period: int) -> float:
    return 2.0 / (period + 1)


def _std_label(std: float) -> str:
    return f"{std:g}".replace(".", "p")


def macd_columns(macd: MacdConfig) -> tuple[str, str, str]:
    suffix = "" if macd == DEFAULT_MACD else f"_{macd.fast}_{macd.slow}_{macd.signal}"
    return f"macd{suffix}", f"macd_signal{suffix}", f"macd_hist{suffix}"


def bollinger_columns(bollinger: BollingerConfig) -> tuple[str, str, str]:
    same = bollinger.period == DEFAULT_BOLLINGER.period and bollinger.std == DEFAULT_BOLLINGER.std
    suffix = "" if same else f"_{bollinger.period}_{_std_label(bollinger.std)}"
    return f"bb_upper{suffix}", f"bb_middle{suffix}", f"bb_lower{suffix}"


@dataclasses.dataclass(frozen=True)
class Column:
    """One stored column and the first index (from the start of the computed series) where it is stable.

    `changes` is non-zero for RSI only: the column is stable at index t >= stable_from when at least
    that many price changes happened in (seed, t], where seed = stable_from.
    """

    name: str
    stable_from: int
    changes: int = 0


@dataclasses.dataclass(frozen=True)
class IndicatorSet:
    """The configured indicators: their columns, stability horizons and the computation itself."""

    config: IndicatorConfig

    def __post_init__(self) -> None:
        # The YAML loader checks MACD and Bollinger periods; plain period lists are checked here.
        for family in ("sma", "ema", "rsi"):
            for i, period in enumerate(getattr(self.config, family)):
                if period < 1:
                    raise ConfigError(f"indicators.{family}[{i}]: must be greater than 0, got {period!r}")

    @functools.cached_property
    def columns(self) -> tuple[Column, ...]:
        return _columns(self.config)

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    @property
    def warmup(self) -> int:
        """Candles of history an update needs before its first row (the slowest horizon)."""
        return max((c.stable_from for c in self.columns), default=0)

    def has_enough_changes(self, close: np.ndarray) -> bool:
        """Whether the history `close` holds the price changes every RSI needs after its seed."""
        changes = _changes(close)
        return all(
            len(close) > c.stable_from and changes[-1] - changes[c.stable_from] >= c.changes
            for c in self.columns
            if c.changes
        )

    def compute(self, close: np.ndarray, at_series_start: bool = True) -> dict[str, np.ndarray]:
        """Column name -> float array aligned with `close`, NaN where not (yet) stable.

        `at_series_start` says whether close[0] is the first candle of the series; only then is a flat
        RSI seed known to be exact (otherwise a flat window start hides the state before it).
        """
        close = np.asarray(close, dtype=float)
        series = pd.Series(close, copy=False)
        changes = _changes(close)
        index = np.arange(len(close))
        out: dict[str, np.ndarray] = {}
        stability = {c.name: c for c in self.columns}

        def put(name: str, values: pd.Series | np.ndarray) -> None:
            values = np.asarray(values, dtype=float)
            column = stability[name]
            stable = index >= column.stable_from
            if column.changes:
                seed = column.stable_from
                if len(close) > seed:
                    enough = changes - changes[seed] >= column.changes
                    exact_seed = at_series_start and changes[seed] == 0
                    stable &= enough | exact_seed
                else:
                    stable[:] = False
            out[name] = np.where(stable, values, np.nan)

        for period in _unique(self.config.sma):
            put(f"sma_{period}", SMAIndicator(series, window=period).sma_indicator())
        for period in _unique(self.config.ema):
            put(f"ema_{period}", EMAIndicator(series, window=period).ema_indicator())
        for period in _unique(self.config.rsi):
            put(f"rsi_{period}", _held_rsi(RSIIndicator(series, window=period).rsi().to_numpy(), changes, period))
        for macd in _unique(self.config.macd):
            line, signal, hist = macd_columns(macd)
            indicator = MACD(series, window_slow=macd.slow, window_fast=macd.fast, window_sign=macd.signal)
            put(line, indicator.macd())
            put(signal, indicator.macd_signal())
            put(hist, indicator.macd_diff())
        for bollinger in _unique(self.config.bollinger):
            upper, middle, lower = bollinger_columns(bollinger)
            indicator = BollingerBands(series, window=bollinger.period, window_dev=bollinger.std)
            put(upper, indicator.bollinger_hband())
            put(middle, indicator.bollinger_mavg())
            put(lower, indicator.bollinger_lband())
        return {name: out[name] for name in self.names}


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def _changes(close: np.ndarray) -> np.ndarray:
    """changes[t] = number of candles in [1, t] whose close differs from the previous close."""
    moved = np.empty(len(close), dtype=np.int64)
    if len(close):
        moved[0] = 0
        moved[1:] = close[1:] != close[:-1]
    return np.cumsum(moved)


def _held_rsi(rsi: np.ndarray, changes: np.ndarray, period: int) -> np.ndarray:
    """`ta`'s RSI with flat candles holding the previous value and 50 before the first price change.

    Holding is exact arithmetic (both Wilder averages shrink by the same factor on a flat candle); it
    only differs from `ta` once a very long flat stretch underflows the averages, where `ta` jumps to
    100. `ta`'s first value (index period-1) is kept as it is: it has no predecessor to hold.
    """
    n = len(rsi)
    if n < period:
        return np.full(n, np.nan)
    moved = np.empty(n, dtype=bool)
    moved[0] = False
    moved[1:] = changes[1:] != changes[:-1]
    keep = moved.copy()
    keep[period - 1] = True
    values = np.where(keep, rsi, np.nan)
    values[(changes == 0) & (np.arange(n) >= period - 1)] = 50.0
    values[: period - 1] = np.nan
    return pd.Series(values, copy=False).ffill().to_numpy()


def _columns(config: IndicatorConfig) -> tuple[Column, ...]:
    columns: list[Column] = []
    for period in _unique(config.sma):
        columns.append(Column(f"sma_{period}", period - 1))
    for period in _unique(config.ema):
        columns.append(Column(f"ema_{period}", period - 1 + decay_horizon(_ema_alpha(period), PRICE_SEED_BOUND)))
    for period in _unique(config.rsi):
        columns.append(Column(f"rsi_{period}", period, decay_horizon(1.0 / period, RSI_SEED_BOUND)))
    for macd in _unique(config.macd):
        line, signal, hist = macd_columns(macd)
        # The line is the difference of two EMAs: twice the bound, decaying at the slower rate.
        line_from = macd.slow - 1 + decay_horizon(_ema_alpha(macd.slow), 2 * PRICE_SEED_BOUND)
        signal_from = macd.slow - 1 + _signal_horizon(macd)
        columns += [Column(line, line_from), Column(signal, signal_from), Column(hist, signal_from)]
    for bollinger in _unique(config.bollinger):
        columns += [Column(name, bollinger.period - 1) for name in bollinger_columns(bollinger)]
    return tuple(columns)


def indicator_set(config: IndicatorConfig | None = None) -> IndicatorSet:
    return _indicator_set(config if config is not None else get_config().indicators)


@functools.lru_cache(maxsize=16)
def _indicator_set(config: IndicatorConfig) -> IndicatorSet:
    # Cached, so the stability horizons (and `columns`) are worked out once per config, not per update.
    return IndicatorSet(config)


# --- Storage ----------------------------------------------------------------------------------------


def update_indicators(exchange_id: str, symbol: str, timeframe: str, from_ts: int) -> int:
    """Recompute and store indicators for every candle at or after `from_ts`; returns the rows upserted.

    Collection calls this once per run with the earliest ts it wrote (new, revised or gap-filling
    candles): every value from there to the end of the series depends on it. History before `from_ts`
    is read only as warm-up. Upserts are keyed like candles, so running it twice changes nothing.
    """
    return len(_recompute(exchange_id, symbol, timeframe, from_ts, indicator_set()))


def recompute_series(exchange_id: str, symbol: str, timeframe: str, config: IndicatorConfig | None = None) -> int:
    """Rebuild a series' indicators from scratch: every row rewritten with exactly the configured columns.

    Rows whose candle no longer exists are deleted. Returns the rows upserted.
    """
    first = store.first_ts(exchange_id, symbol, timeframe)
    written = np.empty(0, dtype=np.int64)
    if first is not None:
        written = _recompute(exchange_id, symbol, timeframe, first, indicator_set(config))
    stored = _stored_ts(exchange_id, symbol, timeframe)
    orphans = np.setdiff1d(stored, written, assume_unique=True).tolist()
    for start in range(0, len(orphans), store.ITER_CHUNK):
        _delete_ts(exchange_id, symbol, timeframe, orphans[start : start + store.ITER_CHUNK])
    return len(written)


def _recompute(exchange_id: str, symbol: str, timeframe: str, from_ts: int, indicators: IndicatorSet) -> np.ndarray:
    """Compute and upsert the rows from `from_ts` to the end of the series; returns their ts."""
    ts, close, skip, at_series_start = _read_window(exchange_id, symbol, timeframe, from_ts, indicators)
    if skip == len(ts):
        return ts[skip:]
    values = indicators.compute(close, at_series_start=at_series_start)
    write_indicators(exchange_id, symbol, timeframe, ts[skip:], {name: v[skip:] for name, v in values.items()})
    return ts[skip:]


def _read_window(
    exchange_id: str, symbol: str, timeframe: str, from_ts: int, indicators: IndicatorSet
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Candles from far enough before `from_ts` to the end: (ts, close, index of from_ts, at series start).

    Far enough means `indicators.warmup` candles that also hold the price changes RSI needs. The store
    is read by time, so the span is a guess in candles (exact for a series without gaps) that widens
    until the history suffices or reaches the series' first candle; one query in the common case.
    """
    step = timeframe_ms(timeframe)
    span = indicators.warmup + 1
    while True:
        start = from_ts - span * step
        ts, close = _read_closes(exchange_id, symbol, timeframe, start)
        skip = int(np.searchsorted(ts, from_ts))
        if skip == len(ts):
            return ts, close, skip, False  # nothing at or after from_ts: no history needed
        if skip >= indicators.warmup and indicators.has_enough_changes(close[:skip]):
            return ts, close, skip, False
        first = store.first_ts(exchange_id, symbol, timeframe)
        if first is None or first >= start:
            return ts, close, skip, True
        span *= 4


def _read_closes(exchange_id: str, symbol: str, timeframe: str, start_ts: int) -> tuple[np.ndarray, np.ndarray]:
    """(ts, close) of the series' candles from `start_ts` on, as arrays.

    Only the two columns are read, straight from the store's collection or table: an update reads a
    thousand or so candles each time and a recompute millions, where full candle rows would cost more
    than the computation. PostgreSQL returns them as two binary arrays that numpy reads in place,
    rather than a Python tuple per candle.
    """
    if store.uses_mongo():
        cursor = (
            store.get_mongo_db()[store.CANDLES]
            .find(store.mongo_filter(exchange_id, symbol, timeframe, start_ts, None), {"_id": 0, "ts": 1, "close": 1})
            .sort("ts", 1)
        )
        rows = [(doc["ts"], doc["close"]) for doc in cursor]
    elif connection.vendor == "postgresql":
        connection.ensure_connection()
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.adapters.register_loader(_INT8_ARRAY_OID, _RawLoader)
            cursor.adapters.register_loader(_FLOAT8_ARRAY_OID, _RawLoader)
            cursor.execute(
                "SELECT array_agg(ts ORDER BY ts), array_agg(close ORDER BY ts) "
                f"FROM {Candle._meta.db_table} "
                "WHERE exchange_id = %s AND symbol = %s AND timeframe = %s AND ts >= %s",
                [exchange_id, symbol, timeframe, start_ts],
                binary=True,
            )
            ts, close = cursor.fetchone()
        return _parse_binary_array(ts, _INT8), _parse_binary_array(close, _FLOAT8)
    else:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT ts, close FROM {Candle._meta.db_table} "
                "WHERE exchange_id = %s AND symbol = %s AND timeframe = %s AND ts >= %s ORDER BY ts",
                [exchange_id, symbol, timeframe, start_ts],
            )
            rows = cursor.fetchall()
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=float)
    ts, close = zip(*rows, strict=True)
    return np.array(ts, dtype=np.int64), np.array(close, dtype=float)


def write_indicators(
    exchange_id: str, symbol: str, timeframe: str, ts: np.ndarray, columns: dict[str, np.ndarray]
) -> None:
    """Store one row per ts whose values are exactly `columns` (NaN is null), keyed like the candles.

    Rows that already hold exactly these values are left alone. That is every row of a repeated update
    and of a recompute without a config change; an append of new candles writes only new rows, which
    the SQL store inserts without ON CONFLICT's speculative insertion (half the cost on PostgreSQL).
    """
    if store.uses_mongo():
        _mongo_write(exchange_id, symbol, timeframe, ts, columns)
        return
    packed = PackedRows.pack(ts, columns)
    write = _postgres_write if connection.vendor == "postgresql" else _orm_write
    for start in range(0, len(packed.ts), SQL_WRITE_BATCH):
        batch = packed.take(slice(start, start + SQL_WRITE_BATCH))
        stored = _stored_rows(exchange_id, symbol, timeframe, int(batch.ts[0]), int(batch.ts[-1]))
        new, changed = batch.compare(stored)
        write(exchange_id, symbol, timeframe, batch.take(new), batch.take(changed))


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of one series as the SQL table stores them: one column list for all, one packed block per ts."""

    ts: np.ndarray
    columns: str
    matrix: np.ndarray  # (rows, columns) of big-endian float64, C-contiguous

    @classmethod
    def pack(cls, ts: np.ndarray, columns: dict[str, np.ndarray]) -> "PackedRows":
        matrix = np.empty((len(ts), len(columns)), dtype=">f8")
        for j, values in enumerate(columns.values()):
            matrix[:, j] = values
        # One NaN bit pattern (0/0 inside ta gives the negative one), so equal rows are equal bytes.
        matrix[np.isnan(matrix)] = np.nan
        return cls(np.asarray(ts, dtype=np.int64), ",".join(columns), matrix)

    def take(self, index: slice | np.ndarray) -> "PackedRows":
        return PackedRows(self.ts[index], self.columns, np.ascontiguousarray(self.matrix[index]))

    def data(self) -> list[bytes]:
        """Each row's packed values."""
        width = self.matrix.shape[1] * 8
        blob = self.matrix.tobytes()
        return [blob[i : i + width] for i in range(0, len(blob), width)] if width else [b""] * len(self.ts)

    def compare(self, stored: list[tuple[int, str, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """Indices of rows not stored yet and of rows stored with other columns or values."""
        is_stored = np.zeros(len(self.ts), dtype=bool)
        differs = np.zeros(len(self.ts), dtype=bool)
        if stored:
            stored_ts = np.fromiter((row[0] for row in stored), dtype=np.int64, count=len(stored))
            position = np.searchsorted(self.ts, stored_ts).clip(max=len(self.ts) - 1)
            ours = self.ts[position] == stored_ts  # the table may hold ts this batch has not (orphans)
            position, rows = position[ours], [row for row, keep in zip(stored, ours.tolist(), strict=True) if keep]
            is_stored[position] = True
            width = self.matrix.shape[1] * 8
            same_layout = np.array([row[1] == self.columns and len(row[2]) == width for row in rows], dtype=bool)
            differs[position[~same_layout]] = True
            comparable = position[same_layout]
            if len(comparable) and width:
                blob = b"".join(bytes(row[2]) for row, same in zip(rows, same_layout.tolist(), strict=True) if same)
                old = np.frombuffer(blob, dtype=">u8").reshape(len(comparable), -1)
                differs[comparable] = (old != self.matrix[comparable].view(">u8")).any(axis=1)
        return np.flatnonzero(~is_stored), np.flatnonzero(differs)


def _stored_rows(exchange_id: str, symbol: str, timeframe: str, first: int, last: int) -> list[tuple[int, str, bytes]]:
    """(ts, columns, data) of the SQL table's rows of a series within [first, last]."""
    if connection.vendor == "postgresql":
        connection.ensure_connection()
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(
                f"SELECT ts, columns, data FROM {IndicatorRow._meta.db_table} "
                "WHERE exchange_id = %s AND symbol = %s AND timeframe = %s AND ts BETWEEN %s AND %s",
                [exchange_id, symbol, timeframe, first, last],
                binary=True,
            )
            return cursor.fetchall()
    return list(
        store.sql_series(IndicatorRow, exchange_id, symbol, timeframe, first, last)
        .values_list("ts", "columns", "data")
        .order_by()
    )


def _postgres_write(exchange_id: str, symbol: str, timeframe: str, new: PackedRows, changed: PackedRows) -> None:
    """INSERT the new rows, upsert the changed ones; each statement takes ts and data as two binary arrays.

    A plain INSERT costs half of INSERT ... ON CONFLICT (no speculative insertion per row). Should
    another writer (a recompute beside the scheduler) insert one of the new rows between the read of
    the stored rows and this INSERT, the unique key refuses it and the upsert settles the batch.
    """
    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:
        cursor.adapters.register_dumper(_BinaryArray, _BinaryArrayDumper)
        if len(new.ts):
            try:
                # Inside a caller's transaction the failed INSERT must be rolled back to a savepoint; in
                # autocommit it is a transaction of its own (BEGIN and COMMIT would cost a round trip each).
                with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
                    _postgres_insert(cursor, exchange_id, symbol, timeframe, new, upsert=False)
            except psycopg.errors.UniqueViolation:
                _postgres_insert(cursor, exchange_id, symbol, timeframe, new, upsert=True)
        if len(changed.ts):
            _postgres_insert(cursor, exchange_id, symbol, timeframe, changed, upsert=True)


def _postgres_insert(
    cursor: psycopg.Cursor, exchange_id: str, symbol: str, timeframe: str, rows: PackedRows, upsert: bool
) -> None:
    sql = f"""
        INSERT INTO {IndicatorRow._meta.db_table} AS i (exchange_id, symbol, timeframe, ts, columns, data)
        SELECT %s, %s, %s, r.ts, %s, r.data FROM unnest(%s::bigint[], %s::bytea[]) AS r(ts, data)
    """
    if upsert:
        sql += """
            ON CONFLICT (exchange_id, symbol, timeframe, ts) DO UPDATE
            SET columns = EXCLUDED.columns, data = EXCLUDED.data
            WHERE (i.columns, i.data) IS DISTINCT FROM (EXCLUDED.columns, EXCLUDED.data)
        """
    # The arrays travel in PostgreSQL's binary array format, encoded by numpy in one go: psycopg
    # adapts a list element by element in Python, and Django's cursors bind client-side (parameters
    # become SQL text). A plain psycopg cursor on Django's connection (so inside any transaction Django
    # has open) binds them.
    cursor.execute(
        sql,
        [exchange_id, symbol, timeframe, rows.columns, _BinaryArray.int8(rows.ts), _BinaryArray.bytea(rows.matrix)],
    )


# Element type oid and big-endian dtype of the arrays exchanged with PostgreSQL.
_INT8 = (20, ">i8")
_FLOAT8 = (701, ">f8")
_BYTEA_OID = 17
_INT8_ARRAY_OID = 1016
_FLOAT8_ARRAY_OID = 1022


class _BinaryArray:
    """A 1-d array sent as a PostgreSQL array in binary wire format (what array_send produces)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @staticmethod
    def _header(oid: int, length: int) -> bytes:
        # ndim 1, no NULL elements, element oid, one dimension of `length` with lower bound 1; then
        # (length, bytes) per element.
        return struct.pack(">iiiii", 1, 0, oid, length, 1)

    @classmethod
    def int8(cls, values: np.ndarray) -> "_BinaryArray":
        oid, dtype = _INT8
        items = np.empty(len(values), dtype=[("length", ">i4"), ("value", dtype)])
        items["length"] = 8
        items["value"] = values
        return cls(cls._header(oid, len(values)) + items.tobytes())

    @classmethod
    def bytea(cls, matrix: np.ndarray) -> "_BinaryArray":
        """One bytea element per row of a big-endian float64 matrix: the row's packed values."""
        rows, width = matrix.shape[0], matrix.shape[1] * 8
        items = np.empty((rows, 4 + width), dtype=np.uint8)
        items[:, :4] = np.frombuffer(struct.pack(">i", width), dtype=np.uint8)
        items[:, 4:] = matrix.view(np.uint8).reshape(rows, width)
        return cls(cls._header(_BYTEA_OID, rows) + items.tobytes())


class _BinaryArrayDumper(psycopg.adapt.Dumper):
    format = psycopg.pq.Format.BINARY

    def dump(self, obj: _BinaryArray) -> bytes:
        return obj.data


class _RawLoader(psycopg.adapt.Loader):
    """Hands over a binary value's bytes untouched (for numpy to read arrays in one go)."""

    format = psycopg.pq.Format.BINARY

    def load(self, data: bytes | bytearray | memoryview) -> bytes:
        return bytes(data)


def _parse_binary_array(data: bytes | None, element: tuple[int, str]) -> np.ndarray:
    """A one-dimensional PostgreSQL array without NULLs, in binary format, as a native numpy array."""
    dtype = np.dtype(element[1]).newbyteorder("=")
    if data is None or struct.unpack_from(">i", data)[0] == 0:
        return np.empty(0, dtype=dtype)
    length = struct.unpack_from(">i", data, 12)[0]
    items = np.frombuffer(data, dtype=[("length", ">i4"), ("value", element[1])], count=length, offset=20)
    return items["value"].astype(dtype)


def _orm_write(exchange_id: str, symbol: str, timeframe: str, new: PackedRows, changed: PackedRows) -> None:
    """The portable path (SQLite): one upsert of the new and changed rows, in batches."""
    rows = [
        IndicatorRow(
            exchange_id=exchange_id, symbol=symbol, timeframe=timeframe, ts=ts, columns=part.columns, data=data
        )
        for part in (new, changed)
        for ts, data in zip(part.ts.tolist(), part.data(), strict=True)
    ]
    IndicatorRow.objects.bulk_create(
        rows,
        batch_size=SQL_BATCH,
        update_conflicts=True,
        unique_fields=["exchange_id", "symbol", "timeframe", "ts"],
        update_fields=["columns", "data"],
    )


def _rows(ts: np.ndarray, columns: dict[str, np.ndarray]) -> Iterable[tuple[int, dict[str, float | None]]]:
    names = list(columns)
    # One list of Python floats per column, then NaN -> None, is much faster than per-cell numpy access.
    lists = [[None if math.isnan(v) else v for v in columns[name].tolist()] for name in names]
    for i, key in enumerate(ts.tolist()):
        yield key, {name: values[i] for name, values in zip(names, lists, strict=True)}


def _mongo_write(exchange_id: str, symbol: str, timeframe: str, ts: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    collection = store.get_mongo_db()[store.INDICATORS]
    operations = [
        UpdateOne(
            {"exchange_id": exchange_id, "symbol": symbol, "timeframe": timeframe, "ts": key},
            {"$set": {"values": values}},
            upsert=True,
        )
        for key, values in _rows(ts, columns)
    ]
    for start in range(0, len(operations), MONGO_BATCH):
        batch = operations[start : start + MONGO_BATCH]
        try:
            collection.bulk_write(batch, ordered=False)
        except BulkWriteError as error:
            # Two writers upserting the same new key at once (a recompute beside the scheduler): the
            # loser gets a duplicate key error; the key now exists, so the same batch again updates it.
            if any(e.get("code") != 11000 for e in error.details.get("writeErrors", [])):
                raise
            collection.bulk_write(batch, ordered=False)


def _stored_ts(exchange_id: str, symbol: str, timeframe: str) -> np.ndarray:
    if store.uses_mongo():
        query = store.mongo_filter(exchange_id, symbol, timeframe, None, None)
        ts = [doc["ts"] for doc in store.get_mongo_db()[store.INDICATORS].find(query, {"_id": 0, "ts": 1})]
    else:
        ts = list(
            store.sql_series(IndicatorRow, exchange_id, symbol, timeframe, None, None).values_list("ts", flat=True)
        )
    return np.array(ts, dtype=np.int64)


def _delete_ts(exchange_id: str, symbol: str, timeframe: str, ts: list[int]) -> None:
    if store.uses_mongo():
        query = {**store.mongo_filter(exchange_id, symbol, timeframe, None, None), "ts": {"$in": ts}}
        store.get_mongo_db()[store.INDICATORS].delete_many(query)
    else:
        store.sql_series(IndicatorRow, exchange_id, symbol, timeframe, None, None).filter(ts__in=ts).delete()


def read_indicators(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    limit: int | None = None,
) -> list[tuple[int, dict[str, float | None]]]:
    """Stored rows (ts, values) in ascending ts, bounds inclusive, at most `limit` of them."""
    if limit is not None and limit <= 0:
        return []
    if store.uses_mongo():
        cursor = (
            store.get_mongo_db()[store.INDICATORS]
            .find(
                store.mongo_filter(exchange_id, symbol, timeframe, start_ts, end_ts), {"_id": 0, "ts": 1, "values": 1}
            )
            .sort("ts", 1)
        )
        if limit is not None:
            cursor = cursor.limit(limit)
        return [(doc["ts"], doc.get("values") or {}) for doc in cursor]
    queryset = store.sql_series(IndicatorRow, exchange_id, symbol, timeframe, start_ts, end_ts).order_by("ts")
    if limit is not None:
        queryset = queryset[:limit]
    return [(ts, unpack_values(columns, data)) for ts, columns, data in queryset.values_list("ts", "columns", "data")]


def iter_indicators(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    limit: int | None = None,
    chunk_size: int = store.ITER_CHUNK,
) -> Iterator[tuple[int, dict[str, float | None]]]:
    """Like read_indicators, one chunk (a keyset-paged query) in memory at a time."""
    return store.iter_chunks(
        lambda start, size: read_indicators(exchange_id, symbol, timeframe, start, end_ts, size),
        start_ts,
        limit,
        chunk_size,
    )
