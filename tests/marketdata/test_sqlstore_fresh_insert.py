"""PostgreSQL candle writes: a plain INSERT for a range the series holds nothing in, the upsert otherwise.

The counts and the stored rows must be those of the upsert whichever statement wrote them: beside stored
candles, around a stored candle the batch does not hold, and when another writer's candle makes the
plain INSERT fail (simulated by taking the emptiness check out: two real writers would have to meet
inside one statement).
"""

import pytest
from django.db import connection

from apps.marketdata import sqlstore, store
from apps.marketdata.store import UpsertResult

MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = ("binance", "BTC/USDT", "1m")


def candle(i: int, close: float = 100.0) -> list:
    return [T0 + i * MINUTE, close - 1, close + 2, close - 2, close, 1.0]


@pytest.fixture(autouse=True)
def postgres_sql_store(sql_store):
    if connection.vendor != "postgresql":
        pytest.skip("the fresh-range INSERT is PostgreSQL's path")


@pytest.mark.django_db
def test_a_range_after_the_stored_candles_is_inserted_and_counted():
    assert store.upsert_candles(*SERIES, [candle(i) for i in range(10)]) == UpsertResult(10, 0, 0)
    assert store.upsert_candles(*SERIES, [candle(i) for i in range(10, 20)]) == UpsertResult(10, 0, 0)
    assert store.read_candles(*SERIES) == [candle(i) for i in range(20)]


@pytest.mark.django_db
def test_a_stored_candle_inside_the_range_sends_the_batch_to_the_upsert():
    store.upsert_candles(*SERIES, [candle(5, close=7.0)])

    rows = [candle(i) for i in range(10) if i != 5] + [candle(3, close=100.0)]
    assert store.upsert_candles(*SERIES, rows) == UpsertResult(9, 0, 0)
    assert store.upsert_candles(*SERIES, [candle(4, close=1.0), candle(5, close=7.0)]) == UpsertResult(0, 1, 1)
    assert store.read_candles(*SERIES)[3:6] == [candle(3), candle(4, close=1.0), candle(5, close=7.0)]


def write_past_the_check(monkeypatch) -> None:
    """The INSERT as if another writer's candle arrived after the check: the unique key refuses it."""
    statement = sqlstore._postgres_statement

    def unguarded(fresh: bool, anomalies: bool) -> str:
        sql = statement(fresh, anomalies)
        if fresh:
            guarded, sql = sql, sql.replace("SELECT NOT EXISTS (", "SELECT EXISTS (SELECT) OR NOT EXISTS (")
            assert sql != guarded
        return sql

    monkeypatch.setattr(sqlstore, "_postgres_statement", unguarded)
    store.upsert_candles(*SERIES, [candle(2, close=9.0)])

    assert store.upsert_candles(*SERIES, [candle(i) for i in range(5)]) == UpsertResult(4, 1, 0)
    assert store.read_candles(*SERIES) == [candle(i) for i in range(5)]
    # The refused INSERT took its statistics with it; the upsert counted the four new candles.
    assert store.statistics(*SERIES)[3:6] == (T0, T0 + 4 * MINUTE, 5)


@pytest.mark.django_db
def test_a_refused_insert_inside_a_transaction_rolls_back_to_a_savepoint_and_upserts(monkeypatch):
    assert connection.in_atomic_block
    write_past_the_check(monkeypatch)


@pytest.mark.django_db(transaction=True)
def test_a_refused_insert_in_autocommit_upserts(monkeypatch):
    assert not connection.in_atomic_block
    write_past_the_check(monkeypatch)


@pytest.mark.django_db
def test_ranges_the_series_holds_nothing_in_never_run_the_upsert(monkeypatch):
    statement = sqlstore._postgres_statement
    monkeypatch.setattr(  # the upsert fails if run
        sqlstore,
        "_postgres_statement",
        lambda fresh, anomalies: statement(fresh, anomalies) if fresh else "SELECT 1 / 0",
    )

    assert store.upsert_candles(*SERIES, [candle(i) for i in range(10, 20)]) == UpsertResult(10, 0, 0)
    assert store.upsert_candles(*SERIES, [candle(i) for i in range(20, 30)]) == UpsertResult(10, 0, 0)
    assert store.upsert_candles(*SERIES, [candle(i) for i in range(5)]) == UpsertResult(5, 0, 0)
