"""update_indicators and recompute_series over the stores: TA-Lib equality, incremental = full, revisions, gaps.

The heavy cases run on the SQL store (PostgreSQL); the backend-contract cases also on mongomock-ng.
"""

import numpy as np
import pytest
from backtesting.test import GOOG
from django.db import connection

from apps.marketdata import sqlstore, store
from apps.marketdata.indicators import (
    IndicatorSet,
    indicator_set,
    recompute_series,
    update_indicators,
)
from apps.marketdata.models import IndicatorRow, unpack_values
from apps.marketdata.sqlstore import PackedRows
from apps.marketdata.store import read_indicators, write_indicators
from datacollector.config import BollingerConfig, IndicatorConfig, MacdConfig, get_config
from tests.marketdata.test_indicators import errors, random_walk, talib_reference

SERIES = ("simulated", "BTC/USDT", "1m")
STEP = 60_000
T0 = 1_699_999_980_000  # a minute boundary


def ts_of(index: int) -> int:
    return T0 + index * STEP


def put_candles(close: np.ndarray, first_index: int = 0) -> int:
    """Store closes as candles at consecutive minutes from `first_index`; returns the first ts."""
    rows = [[ts_of(first_index + i), c, c * 1.001, c * 0.999, c, 1.0] for i, c in enumerate(close.tolist())]
    store.upsert_candles(*SERIES, rows)
    return ts_of(first_index)


def stored(names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rows = read_indicators(*SERIES)
    ts = np.array([row[0] for row in rows], dtype=np.int64)
    columns = {name: np.array([np.nan if row[1][name] is None else row[1][name] for row in rows]) for name in names}
    return ts, columns


def all_closes() -> np.ndarray:
    return np.array([row[4] for row in store.read_candles(*SERIES)])


def assert_equals_full_recompute(indicators: IndicatorSet, tolerance: float = 1e-9) -> None:
    """Stored rows are exactly the candles' ts and equal a from-scratch computation over all candles."""
    close = all_closes()
    expected = indicators.compute(close)
    ts, columns = stored(indicators.names)
    assert ts.tolist() == [row[0] for row in store.read_candles(*SERIES)]
    for name in indicators.names:
        assert np.array_equal(np.isnan(columns[name]), np.isnan(expected[name])), f"{name}: null positions differ"
        worst = errors(name, columns[name], expected[name], close)[~np.isnan(expected[name])].max(initial=0.0)
        assert worst < tolerance, f"{name}: differs from the full recompute by {worst:.3g}"


@pytest.fixture
def default_set(db) -> IndicatorSet:
    # The set in force is read from the database (an operator may have stored one), else collector.yaml.
    return indicator_set()


@pytest.fixture
def short_periods(db, settings, tmp_path):
    """A collector.yaml whose indicator set has short periods, read by get_config() for this test (the set
    in force is read from the database first: none is stored there)."""
    path = tmp_path / "collector.yaml"
    path.write_text(
        "rate_limits:\n  default: {weight_per_minute: 1200, burst: 20}\n"
        "indicators:\n  rsi: [3]\n  ema: [4]\n  sma: [3]\n"
        "  macd: [{fast: 2, slow: 4, signal: 2}]\n  bollinger: [{period: 3, std: 1.5}]\n"
    )
    settings.COLLECTOR_CONFIG = path
    get_config.cache_clear()
    yield path
    get_config.cache_clear()


def test_config_default_set_is_what_collector_yaml_configures(default_set):
    assert default_set.config == IndicatorConfig()


def test_update_from_the_first_candle_stores_talib_values(sql_store, default_set):
    close = random_walk(n=5_000)
    first = put_candles(close)
    assert update_indicators(*SERIES, first) == 5_000
    ts, columns = stored(default_set.names)
    assert len(ts) == 5_000
    reference = talib_reference(close, default_set.config)
    for column in default_set.columns:
        values = columns[column.name]
        assert np.isnan(values[: column.stable_from + column.changes]).all(), column.name
        assert not np.isnan(values[column.stable_from + column.changes :]).any(), column.name
        assert errors(column.name, values, reference[column.name], close)[~np.isnan(values)].max() < 1e-8


def test_real_prices_updated_incrementally_equal_talib(sql_store, default_set):
    close = GOOG["Close"].to_numpy(dtype=float)  # 2,148 daily closes
    for start in range(0, len(close), 500):
        update_indicators(*SERIES, put_candles(close[start : start + 500], start))
    _, columns = stored(default_set.names)
    reference = talib_reference(close, default_set.config)
    for name, values in columns.items():
        assert (~np.isnan(values)).sum() > 1_400, name
        assert errors(name, values, reference[name], close)[~np.isnan(values)].max() < 1e-8, name
    assert_equals_full_recompute(default_set)


def test_rows_store_null_not_nan_or_zero_before_stable(sql_store, default_set):
    put_candles(random_walk(n=300))
    update_indicators(*SERIES, ts_of(0))
    values = IndicatorRow.objects.get(ts=ts_of(100)).values
    assert values["sma_20"] is not None
    assert values["ema_12"] is None
    assert values["rsi_14"] is None
    assert set(values) == set(default_set.names)


def test_incremental_updates_equal_a_full_recompute(sql_store, default_set):
    close = random_walk(n=2_500, seed=21)
    put_candles(close[:1_000])
    update_indicators(*SERIES, ts_of(0))
    for start in range(1_000, 2_500, 500):
        assert update_indicators(*SERIES, put_candles(close[start : start + 500], start)) == 500
    assert_equals_full_recompute(default_set)


def test_incremental_updates_equal_a_full_recompute_on_each_backend(candle_store, short_periods):
    # Short periods keep the warm-up (and so the series) small: mongomock-ng upserts are slow.
    indicators = indicator_set()
    assert indicators.warmup < 100
    close = random_walk(n=300, seed=22)
    put_candles(close[:150])
    update_indicators(*SERIES, ts_of(0))
    for start in range(150, 300, 75):
        assert update_indicators(*SERIES, put_candles(close[start : start + 75], start)) == 75
    assert_equals_full_recompute(indicators)


def test_young_series_counts_its_null_prefix_from_the_series_start(sql_store, default_set):
    close = random_walk(n=900, seed=4)
    for start in range(0, 900, 60):
        update_indicators(*SERIES, put_candles(close[start : start + 60], start))
    assert_equals_full_recompute(default_set)


def test_revised_candle_recomputes_every_value_after_it(sql_store, default_set):
    close = random_walk(n=3_000, seed=8)
    put_candles(close)
    update_indicators(*SERIES, ts_of(0))
    before = {row[0]: row[1] for row in read_indicators(*SERIES)}
    revised = close[1_800] * 1.05
    put_candles(np.array([revised]), 1_800)
    update_indicators(*SERIES, ts_of(1_800))
    assert_equals_full_recompute(default_set)
    after = {row[0]: row[1] for row in read_indicators(*SERIES)}
    assert all(after[ts_of(i)] == before[ts_of(i)] for i in range(1_800))
    assert after[ts_of(1_950)]["ema_50"] != before[ts_of(1_950)]["ema_50"]  # EMA memory reaches past the SMA window


def test_gap_filled_by_a_refetch_recomputes_everything_after_it(sql_store, default_set):
    close = random_walk(n=3_000, seed=9)
    put_candles(close[:1_500])
    put_candles(close[1_600:], 1_600)
    update_indicators(*SERIES, ts_of(0))
    assert_equals_full_recompute(default_set)  # the gap's neighbours are consecutive rows meanwhile
    assert IndicatorRow.objects.filter(ts=ts_of(1_550)).count() == 0
    put_candles(close[1_500:1_600], 1_500)
    update_indicators(*SERIES, ts_of(1_500))
    assert_equals_full_recompute(default_set)
    assert IndicatorRow.objects.count() == 3_000


def test_older_history_backfilled_later_moves_the_null_prefix(sql_store, default_set):
    close = random_walk(n=2_000, seed=10)
    put_candles(close[1_000:], 1_000)
    update_indicators(*SERIES, ts_of(1_000))
    assert IndicatorRow.objects.get(ts=ts_of(1_100)).values["ema_50"] is None
    update_indicators(*SERIES, put_candles(close[:1_000]))
    assert_equals_full_recompute(default_set)
    assert IndicatorRow.objects.get(ts=ts_of(1_100)).values["ema_50"] is not None


def test_warmup_reaches_back_past_a_flat_stretch_for_rsi(sql_store, default_set):
    # 1,500 flat candles before the update: longer than the warm-up in candles, so only counting price
    # changes finds the history RSI needs.
    close = np.r_[random_walk(n=1_000, seed=12), np.full(1_500, 30_000.0), random_walk(n=600, seed=13, start=30_000.0)]
    put_candles(close[:2_600])
    update_indicators(*SERIES, ts_of(0))
    update_indicators(*SERIES, put_candles(close[2_600:], 2_600))
    assert_equals_full_recompute(default_set)
    assert IndicatorRow.objects.get(ts=ts_of(3_000)).values["rsi_14"] is not None


def test_update_is_idempotent(sql_store, default_set):
    put_candles(random_walk(n=1_200, seed=14))
    assert update_indicators(*SERIES, ts_of(0)) == 1_200
    first = read_indicators(*SERIES)
    assert update_indicators(*SERIES, ts_of(0)) == 1_200
    assert read_indicators(*SERIES) == first


def tuple_ids() -> dict[int, str]:
    """ts -> the physical location of the row's current version (PostgreSQL's ctid): a rewrite moves it."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT ts, ctid::text FROM {IndicatorRow._meta.db_table}")
        return dict(cursor.fetchall())


def test_a_repeated_update_rewrites_no_row(sql_store):
    put_candles(random_walk(n=1_200, seed=14))
    update_indicators(*SERIES, ts_of(0))
    before = tuple_ids()
    assert update_indicators(*SERIES, ts_of(0)) == 1_200
    assert tuple_ids() == before


def test_an_update_rewrites_only_the_rows_whose_values_changed(sql_store, default_set):
    close = random_walk(n=2_000, seed=23)
    put_candles(close)
    update_indicators(*SERIES, ts_of(0))
    before = tuple_ids()
    put_candles(np.array([close[1_900] * 1.01]), 1_900)
    update_indicators(*SERIES, ts_of(0))  # the same window as before: rows up to the revision are bit-identical
    after = tuple_ids()
    assert all(after[ts_of(i)] == before[ts_of(i)] for i in range(1_900))
    assert all(after[ts_of(i)] != before[ts_of(i)] for i in range(1_900, 2_000))
    assert_equals_full_recompute(default_set)


def race_with_another_writer(monkeypatch, default_set) -> None:
    """Stale rows appear after the update read the stored rows (hidden from that read by patching it: two
    writers cannot be interleaved at that exact point for real); the INSERT hits them and the upsert
    settles the batch."""
    close = random_walk(n=1_000, seed=24)
    put_candles(close)
    ts = np.array([ts_of(i) for i in range(400, 600)], dtype=np.int64)
    write_indicators(*SERIES, ts, {name: np.zeros(len(ts)) for name in default_set.names})
    monkeypatch.setattr(sqlstore, "_stored_indicator_rows", lambda *args: [])
    assert update_indicators(*SERIES, ts_of(0)) == 1_000
    assert_equals_full_recompute(default_set)


def test_rows_another_writer_inserted_meanwhile_are_upserted(sql_store, default_set, monkeypatch):
    assert connection.in_atomic_block  # the test's transaction: the failed INSERT rolls back to a savepoint
    race_with_another_writer(monkeypatch, default_set)


@pytest.mark.django_db(transaction=True)
def test_rows_another_writer_inserted_meanwhile_are_upserted_in_autocommit(sql_store, default_set, monkeypatch):
    assert not connection.in_atomic_block
    race_with_another_writer(monkeypatch, default_set)


def test_packed_rows_compare_bytes_with_the_stored_rows():
    nan = float("nan")
    negative_nan = -np.float64(nan)  # what 0/0 gives on x86: NaN with the sign bit set
    rows = PackedRows.pack(
        np.array([10, 20, 30, 40, 50], dtype=np.int64),
        {"a": np.array([1.0, 2.0, negative_nan, 4.0, 5.0]), "b": np.array([nan, 2.5, 3.5, 4.5, 5.5])},
    )
    data = rows.data()
    assert unpack_values(rows.columns, data[2]) == {"a": None, "b": 3.5}
    stored = [
        (10, "a,b", data[0]),  # identical
        (20, "a,b", PackedRows.pack(np.array([20]), {"a": np.array([2.0]), "b": np.array([2.6])}).data()[0]),
        (25, "a,b", data[0]),  # a stored row this batch does not hold (its candle is gone): not ours to judge
        (30, "a,b", PackedRows.pack(np.array([30]), {"a": np.array([nan]), "b": np.array([3.5])}).data()[0]),
        (40, "a", data[3][:8]),  # written under another config
    ]
    new, changed = rows.compare(stored)
    assert new.tolist() == [4]
    assert changed.tolist() == [1, 3]


def test_update_without_candles_at_or_after_from_ts_writes_nothing(candle_store):
    assert update_indicators(*SERIES, ts_of(0)) == 0
    put_candles(random_walk(n=50))
    assert update_indicators(*SERIES, ts_of(50)) == 0
    assert read_indicators(*SERIES) == []


def test_other_series_are_left_alone(sql_store, default_set):
    put_candles(random_walk(n=400))
    store.upsert_candles("simulated", "ETH/USDT", "1m", [[ts_of(0), 1.0, 1.0, 1.0, 1.0, 1.0]])
    update_indicators(*SERIES, ts_of(0))
    assert read_indicators("simulated", "ETH/USDT", "1m") == []
    assert IndicatorRow.objects.filter(symbol="BTC/USDT").count() == 400


def test_recompute_series_keeps_only_configured_columns_and_rows_with_candles(candle_store):
    old = IndicatorConfig(rsi=(7,), ema=(5,), sma=(3,), macd=(MacdConfig(fast=3, slow=6, signal=2),), bollinger=())
    new = IndicatorConfig(rsi=(), ema=(), sma=(3, 5), macd=(), bollinger=(BollingerConfig(period=5, std=1.5),))
    put_candles(random_walk(n=200, seed=15))
    recompute_series(*SERIES, config=old)
    store.delete_series(*SERIES, start_ts=ts_of(150))
    store.delete_series(*SERIES, start_ts=ts_of(40), end_ts=ts_of(49))
    store.delete_series(*SERIES, end_ts=ts_of(4))
    assert recompute_series(*SERIES, config=new) == 135
    rows = read_indicators(*SERIES)
    assert [row[0] for row in rows] == [ts_of(i) for i in range(150) if i >= 5 and not 40 <= i <= 49]
    assert {tuple(sorted(row[1])) for row in rows} == {tuple(sorted(IndicatorSet(new).names))}
    assert_equals_full_recompute(IndicatorSet(new), tolerance=1e-12)


def test_recompute_series_of_a_deleted_series_removes_its_rows(candle_store):
    put_candles(random_walk(n=30))
    recompute_series(*SERIES)
    store.delete_series(*SERIES)
    assert recompute_series(*SERIES) == 0
    assert read_indicators(*SERIES) == []


def test_read_indicators_bounds_and_limit(candle_store):
    put_candles(random_walk(n=40))
    update_indicators(*SERIES, ts_of(0))
    rows = read_indicators(*SERIES, start_ts=ts_of(10), end_ts=ts_of(20), limit=5)
    assert [row[0] for row in rows] == [ts_of(i) for i in range(10, 15)]
    assert read_indicators(*SERIES, limit=0) == []
