"""Indicators (SMA, EMA, RSI, MACD, Bollinger Bands) computed as `ta` computes them after each collection.

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

Storage. The series store keeps the rows (store.write_indicators; MongoDB documents carry `values` as
a mapping, the SQL table packs them as float64 bytes beside the column names). Stored rows that hold
exactly the new values are left alone: a plain append of candles writes only the new rows, a repeated
update nothing, and a revision only the rows from the revised candle on. (Values computed from
different windows agree to 1e-10, not to the bit, so a recompute does rewrite rows an incremental
update wrote.) On PostgreSQL an update of 1,000 candles
costs about 10 ms, write included (benchmarks/bench_indicators.py).

Cost. `ta`'s indicator objects build some forty pandas Series per update, most of a live run's CPU;
`_Averages` runs the same pandas window operations on one Series, each once, so the values are `ta`'s
bit for bit (tests/marketdata/test_indicators.py checks them against `ta` itself).
"""

import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
from django.db import connection

from apps.connectors.exchanges import is_known_exchange
from apps.marketdata import store
from apps.marketdata.models import IndicatorConfig as StoredIndicatorConfig
from apps.marketdata.timeframes import is_valid_timeframe, timeframe_error, timeframe_ms
from datacollector.config import BollingerConfig, ConfigError, IndicatorConfig, MacdConfig, get_config, parse_indicators

EPSILON = 1e-10
PRICE_SEED_BOUND = 10.0
RSI_SEED_BOUND = 1e4

DEFAULT_MACD = MacdConfig()
DEFAULT_BOLLINGER = BollingerConfig()


def decay_horizon(alpha: float, bound: float, epsilon: float = EPSILON) -> int:
    """Steps k after which a seed error of at most `bound` has decayed below `epsilon`: (1-alpha)^k * bound."""
    if alpha >= 1:
        return 1  # A period of 1 keeps nothing of the seed after one step (and log1p(-1) is undefined).
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

        averages = _Averages(close)
        for period in _unique(self.config.sma):
            put(f"sma_{period}", averages.sma(period))
        for period in _unique(self.config.ema):
            put(f"ema_{period}", averages.ema(period))
        for period in _unique(self.config.rsi):
            put(f"rsi_{period}", _held_rsi(averages.rsi(period), changes, period))
        for macd in _unique(self.config.macd):
            line, signal, hist = macd_columns(macd)
            macd_line = averages.ema(macd.fast) - averages.ema(macd.slow)
            macd_signal = _ema(macd_line, macd.signal)
            put(line, macd_line)
            put(signal, macd_signal)
            put(hist, macd_line - macd_signal)
        for bollinger in _unique(self.config.bollinger):
            upper, middle, lower = bollinger_columns(bollinger)
            middle_band = averages.sma(bollinger.period)
            deviation = bollinger.std * averages.std(bollinger.period)
            put(upper, middle_band + deviation)
            put(middle, middle_band)
            put(lower, middle_band - deviation)
        return {name: out[name] for name in self.names}


class _Averages:
    """`ta`'s moving averages of one close series, each computed once (MACD reuses the EMAs, Bollinger the SMA).

    The pandas window operations `ta` runs, with its parameters, so the results are `ta`'s bit for bit.
    """

    def __init__(self, close: np.ndarray) -> None:
        self.close = close
        self.series = pd.Series(close, copy=False)
        self.cache: dict[tuple[str, int], np.ndarray] = {}

    def sma(self, period: int) -> np.ndarray:
        return self._cached("sma", period, lambda: self.series.rolling(period, min_periods=period).mean())

    def std(self, period: int) -> np.ndarray:
        return self._cached("std", period, lambda: self.series.rolling(period, min_periods=period).std(ddof=0))

    def ema(self, period: int) -> np.ndarray:
        return self._cached("ema", period, lambda: _ema(self.close, period))

    def rsi(self, period: int) -> np.ndarray:
        """`ta`'s RSI: Wilder averages seeded with the first (zero) change; 100 where the losses are 0."""
        diff = np.empty(len(self.close))
        diff[:1] = np.nan
        diff[1:] = self.close[1:] - self.close[:-1]
        up = pd.Series(np.where(diff > 0, diff, 0.0), copy=False)
        down = pd.Series(-np.where(diff < 0, diff, 0.0), copy=False)
        up_average = up.ewm(alpha=1 / period, min_periods=period, adjust=False).mean().to_numpy()
        down_average = down.ewm(alpha=1 / period, min_periods=period, adjust=False).mean().to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(down_average == 0, 100, 100 - (100 / (1 + up_average / down_average)))

    def _cached(self, kind: str, period: int, compute: Callable[[], pd.Series | np.ndarray]) -> np.ndarray:
        key = (kind, period)
        if key not in self.cache:
            self.cache[key] = np.asarray(compute(), dtype=float)
        return self.cache[key]


def _ema(values: np.ndarray, period: int) -> np.ndarray:
    """`ta`'s EMA: seeded with the first value, NaN until `period` values were seen (leading NaNs skipped)."""
    series = pd.Series(values, copy=False)
    return series.ewm(span=period, min_periods=period, adjust=False).mean().to_numpy()


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
    return _indicator_set(config if config is not None else configured_indicators())


# A process reads the stored indicator set at most this often (collection asks for it on every run).
CONFIG_CACHE_SECONDS = 5.0
_config_cache: tuple[float, IndicatorConfig | None] | None = None
_config_lock = threading.Lock()


def configured_indicators() -> IndicatorConfig:
    """The indicator set in force: the one stored in the database (PUT /api/v1/indicators/config), else
    collector.yaml's `indicators` section.

    The database is read at most every CONFIG_CACHE_SECONDS per process, so a change reaches every
    scheduler within that; inside a transaction it is read afresh (what the transaction sees).
    """
    global _config_cache
    cacheable = not connection.in_atomic_block
    now = time.monotonic()
    with _config_lock:
        cached = _config_cache
    if cacheable and cached is not None and now - cached[0] < CONFIG_CACHE_SECONDS:
        stored = cached[1]
    else:
        raw = StoredIndicatorConfig.objects.stored()
        # Validated when it was stored; parsed again here so that there is one way in.
        stored = parse_indicators(raw) if raw is not None else None
        if cacheable:
            with _config_lock:
                _config_cache = (now, stored)
    return stored if stored is not None else get_config().indicators


def forget_configured_indicators() -> None:
    """Read the stored indicator set afresh next time (after this process changed it)."""
    global _config_cache
    with _config_lock:
        _config_cache = None


def indicators_yaml(config: IndicatorConfig) -> dict:
    """`config` in the form of collector.yaml's section (and the API's body): lists and mappings."""
    return {
        "rsi": list(config.rsi),
        "ema": list(config.ema),
        "sma": list(config.sma),
        "macd": [dataclasses.asdict(macd) for macd in config.macd],
        "bollinger": [dataclasses.asdict(bollinger) for bollinger in config.bollinger],
    }


def describe_indicators(config: IndicatorConfig) -> list[dict]:
    """Each configured indicator: its family, parameters, output columns and warm-up (candles of history
    before its first stored value, as computed for the whole set)."""
    empty = IndicatorConfig(rsi=(), ema=(), sma=(), macd=(), bollinger=())
    entries = []
    for family in ("sma", "ema", "rsi", "macd", "bollinger"):
        for item in _unique(getattr(config, family)):
            params = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else {"period": item}
            columns = indicator_set(dataclasses.replace(empty, **{family: (item,)})).columns
            entries.append(
                {
                    "indicator": family,
                    "params": params,
                    "columns": [column.name for column in columns],
                    "warmup": max(column.stable_from for column in columns),
                }
            )
    return entries


@functools.lru_cache(maxsize=16)
def _indicator_set(config: IndicatorConfig) -> IndicatorSet:
    # Cached, so the stability horizons (and `columns`) are worked out once per config, not per update.
    return IndicatorSet(config)


# --- Storage ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndicatorRows:
    """Indicator rows as computed and stored: their ts and one array per column (NaN: no value)."""

    ts: np.ndarray
    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ts)

    def latest(self, count: int) -> dict[int, dict[str, float | None]]:
        """The newest `count` rows as {ts: {column: value or None}}, as `store.read_indicators` reads them."""
        start = max(0, len(self.ts) - count)
        return {
            int(self.ts[i]): {
                name: None if column[i] != column[i] else float(column[i]) for name, column in self.values.items()
            }
            for i in range(start, len(self.ts))
        }


def update_indicators(exchange_id: str, symbol: str, timeframe: str, from_ts: int) -> int:
    """Recompute and store indicators for every candle at or after `from_ts`; returns the rows upserted.

    Collection calls this once per run with the earliest ts it wrote (new, revised or gap-filling
    candles): every value from there to the end of the series depends on it. History before `from_ts`
    is read only as warm-up. Upserts are keyed like candles, so running it twice changes nothing.
    """
    return len(refresh_indicators(exchange_id, symbol, timeframe, from_ts))


def refresh_indicators(exchange_id: str, symbol: str, timeframe: str, from_ts: int) -> IndicatorRows:
    """`update_indicators`, returning the rows it stored (a live run publishes the newest of them)."""
    return _recompute(exchange_id, symbol, timeframe, from_ts, indicator_set())


def recompute_series(exchange_id: str, symbol: str, timeframe: str, config: IndicatorConfig | None = None) -> int:
    """Rebuild a series' indicators from scratch: every row rewritten with exactly the configured columns.

    Rows whose candle no longer exists are deleted. Returns the rows upserted.
    """
    first = store.first_ts(exchange_id, symbol, timeframe)
    written = np.empty(0, dtype=np.int64)
    if first is not None:
        written = _recompute(exchange_id, symbol, timeframe, first, indicator_set(config)).ts
    stored = store.indicator_ts(exchange_id, symbol, timeframe)
    store.delete_indicators(exchange_id, symbol, timeframe, np.setdiff1d(stored, written, assume_unique=True).tolist())
    return len(written)


def _recompute(exchange_id: str, symbol: str, timeframe: str, from_ts: int, indicators: IndicatorSet) -> IndicatorRows:
    """Compute and upsert the rows from `from_ts` to the end of the series; returns them."""
    ts, close, skip, at_series_start = _read_window(exchange_id, symbol, timeframe, from_ts, indicators)
    if skip == len(ts):
        return IndicatorRows(ts[skip:], {})
    values = indicators.compute(close, at_series_start=at_series_start)
    rows = IndicatorRows(ts[skip:], {name: v[skip:] for name, v in values.items()})
    store.write_indicators(exchange_id, symbol, timeframe, rows.ts, rows.values)
    return rows


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
        ts, close = store.read_closes(exchange_id, symbol, timeframe, start)
        skip = int(np.searchsorted(ts, from_ts))
        if skip == len(ts):
            return ts, close, skip, False  # nothing at or after from_ts: no history needed
        if skip >= indicators.warmup and indicators.has_enough_changes(close[:skip]):
            return ts, close, skip, False
        first = store.first_ts(exchange_id, symbol, timeframe)
        if first is None or first >= start:
            return ts, close, skip, True
        span *= 4


# --- Recomputing stored series ------------------------------------------------------------------------


class SeriesSelectionError(ValueError):
    """A selection of stored series that names something not stored; `field` is what it names
    (exchange_id, symbols, timeframes, or series for symbols and timeframes together)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def stored_series(exchange_id: str, symbols: list[str], timeframes: list[str]) -> list[store.SeriesStatistics]:
    """The stored series of `exchange_id` (only `symbols` and `timeframes`, when given); every value that
    matches nothing is a SeriesSelectionError naming it. The one check `recompute_indicators` and the API's
    compute share. Read from the series statistics, one indexed query."""
    if not is_known_exchange(exchange_id):
        raise SeriesSelectionError(
            "exchange_id", f"{exchange_id!r} is not a ccxt exchange id (e.g. binance) or simulated."
        )
    bad = [timeframe for timeframe in timeframes if not is_valid_timeframe(timeframe)]
    if bad:
        raise SeriesSelectionError("timeframes", f"{bad[0]}: {timeframe_error(bad[0])}")
    stored = store.series_statistics(exchange_id=exchange_id)
    if not stored:
        raise SeriesSelectionError("exchange_id", f"{exchange_id!r} has no stored candles; nothing to recompute.")
    for field, wanted, have in (
        ("symbols", symbols, {s.symbol for s in stored}),
        ("timeframes", timeframes, {s.timeframe for s in stored}),
    ):
        missing = [value for value in wanted if value not in have]
        if missing:
            raise SeriesSelectionError(
                field, f"{', '.join(missing)}: no stored candles on {exchange_id}; stored: {', '.join(sorted(have))}."
            )
    selected = [
        s for s in stored if (not symbols or s.symbol in symbols) and (not timeframes or s.timeframe in timeframes)
    ]
    if not selected:
        raise SeriesSelectionError(
            "series",
            f"select no stored series on {exchange_id} "
            f"(stored: {', '.join(f'{s.symbol} {s.timeframe}' for s in stored)}).",
        )
    return selected


def run_compute_task(task) -> dict:
    """The `indicators` background task (apps.jobs.tasks): rebuild the indicators of the stored series that
    `task.params` selects (exchange_id, symbols, timeframes) with the indicator set in force, as
    `recompute_indicators` does; progress per series."""
    params = task.params
    series = stored_series(params["exchange_id"], params.get("symbols") or [], params.get("timeframes") or [])
    config = configured_indicators()
    total = sum(s.candles for s in series) or 1
    done = rows = 0
    for s in series:
        task.report(done / total, f"{s.symbol} {s.timeframe}")
        rows += recompute_series(s.exchange_id, s.symbol, s.timeframe, config)
        done += s.candles
    return {"series": len(series), "rows": rows, "columns": indicator_set(config).names}
