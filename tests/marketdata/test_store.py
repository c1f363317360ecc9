"""The candle store contract, run against every backend (see conftest.candle_store)."""

import math

import pytest

from apps.marketdata import mongostore, sqlstore, store
from apps.marketdata.store import Coverage, InvalidCandleError, UpsertResult

pytestmark = [pytest.mark.django_db, pytest.mark.filterwarnings("ignore:'allowDiskUse'")]

MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = ("binance", "BTC/USDT", "1m")


def candle(i: int, close: float = 100.0, volume: float = 1.0) -> list:
    """The candle of minute i after T0, with made-up but plausible values."""
    return [T0 + i * MINUTE, close - 1, close + 2, close - 2, close, volume]


def minutes(*indexes: int) -> list[list]:
    return [candle(i, close=100.0 + i) for i in indexes]


def test_new_candles_are_inserted(candle_store):
    result = store.upsert_candles(*SERIES, minutes(0, 1, 2))

    assert result == UpsertResult(inserted=3, updated=0, unchanged=0)
    assert result.written == 3
    assert store.read_candles(*SERIES) == minutes(0, 1, 2)


def test_upserting_the_same_candles_again_changes_nothing(candle_store):
    store.upsert_candles(*SERIES, minutes(0, 1, 2))

    result = store.upsert_candles(*SERIES, minutes(0, 1, 2))

    assert result == UpsertResult(inserted=0, updated=0, unchanged=3)
    assert result.written == 0
    assert store.read_candles(*SERIES) == minutes(0, 1, 2)


def test_a_revised_candle_is_updated_and_the_rest_count_as_unchanged(candle_store):
    store.upsert_candles(*SERIES, minutes(0, 1, 2))
    revised = [candle(1, close=150.0, volume=7.5)]

    result = store.upsert_candles(*SERIES, [*minutes(0), *revised, *minutes(2, 3)])

    assert result == UpsertResult(inserted=1, updated=1, unchanged=2)
    assert store.read_candles(*SERIES) == [*minutes(0), *revised, *minutes(2, 3)]


def test_a_change_in_any_single_value_counts_as_an_update(candle_store):
    store.upsert_candles(*SERIES, [candle(0)])
    for position in range(1, 6):
        row = candle(0)
        row[position] += 0.5
        assert store.upsert_candles(*SERIES, [row]) == UpsertResult(0, 1, 0)
        assert store.read_candles(*SERIES) == [row]
        store.upsert_candles(*SERIES, [candle(0)])


def test_a_ts_repeated_in_one_call_is_stored_once_with_the_last_values(candle_store):
    result = store.upsert_candles(*SERIES, [candle(0, close=1.0), candle(1), candle(0, close=2.0)])

    assert result == UpsertResult(inserted=2, updated=0, unchanged=0)
    assert store.read_candles(*SERIES) == [candle(0, close=2.0), candle(1)]


def test_integer_values_are_stored_as_floats_and_compare_equal_on_reupsert(candle_store):
    store.upsert_candles(*SERIES, [[T0, 1, 2, 1, 2, 0]])

    assert store.upsert_candles(*SERIES, [[T0, 1.0, 2.0, 1.0, 2.0, 0.0]]) == UpsertResult(0, 0, 1)
    [row] = store.read_candles(*SERIES)
    assert row == [T0, 1.0, 2.0, 1.0, 2.0, 0.0]
    assert all(isinstance(value, float) for value in row[1:])


def test_empty_input_writes_nothing(candle_store):
    assert store.upsert_candles(*SERIES, []) == UpsertResult(0, 0, 0)
    assert store.read_candles(*SERIES) == []


def test_reads_are_ascending_with_inclusive_bounds_and_a_limit(candle_store):
    store.upsert_candles(*SERIES, minutes(5, 3, 1, 0, 4, 2))

    assert [row[0] for row in store.read_candles(*SERIES)] == [T0 + i * MINUTE for i in range(6)]
    assert store.read_candles(*SERIES, start_ts=T0 + MINUTE, end_ts=T0 + 3 * MINUTE) == minutes(1, 2, 3)
    assert store.read_candles(*SERIES, start_ts=T0 + MINUTE + 1) == minutes(2, 3, 4, 5)
    assert store.read_candles(*SERIES, end_ts=T0 + MINUTE - 1) == minutes(0)
    assert store.read_candles(*SERIES, start_ts=T0 + 2 * MINUTE, limit=2) == minutes(2, 3)
    assert store.read_candles(*SERIES, limit=0) == []
    assert store.read_candles(*SERIES, start_ts=T0 + 10 * MINUTE) == []


def test_iter_candles_streams_the_same_rows_chunk_by_chunk(candle_store):
    store.upsert_candles(*SERIES, minutes(*range(10)))

    assert list(store.iter_candles(*SERIES, chunk_size=3)) == minutes(*range(10))
    assert list(store.iter_candles(*SERIES, chunk_size=5)) == minutes(*range(10))
    assert list(store.iter_candles(*SERIES, start_ts=T0 + 2 * MINUTE, end_ts=T0 + 8 * MINUTE, chunk_size=2)) == minutes(
        *range(2, 9)
    )
    assert list(store.iter_candles(*SERIES, limit=4, chunk_size=3)) == minutes(0, 1, 2, 3)


def test_last_ts_and_coverage_describe_the_stored_series(candle_store):
    assert store.last_ts(*SERIES) is None
    assert store.first_ts(*SERIES) is None
    assert store.coverage(*SERIES) == Coverage(None, None, 0)

    store.upsert_candles(*SERIES, minutes(3, 4, 9))

    assert store.last_ts(*SERIES) == T0 + 9 * MINUTE
    assert store.first_ts(*SERIES) == T0 + 3 * MINUTE
    assert store.coverage(*SERIES) == Coverage(T0 + 3 * MINUTE, T0 + 9 * MINUTE, 3)
    assert store.coverage(*SERIES, start_ts=T0 + 4 * MINUTE) == Coverage(T0 + 4 * MINUTE, T0 + 9 * MINUTE, 2)


def test_series_are_isolated_by_exchange_symbol_and_timeframe(candle_store):
    others = [("kraken", "BTC/USDT", "1m"), ("binance", "ETH/USDT", "1m"), ("binance", "BTC/USDT", "5m")]
    store.upsert_candles(*SERIES, minutes(0, 1))
    for other in others:
        assert store.upsert_candles(*other, [candle(0, close=7.0)]) == UpsertResult(1, 0, 0)

    assert store.read_candles(*SERIES) == minutes(0, 1)
    assert store.last_ts(*SERIES) == T0 + MINUTE
    for other in others:
        assert store.read_candles(*other) == [candle(0, close=7.0)]
        assert store.coverage(*other) == Coverage(T0, T0, 1)
    assert store.list_series() == sorted([SERIES, *others])
    assert store.delete_series(*SERIES) == 2
    assert store.read_candles(*SERIES) == []
    assert store.list_series() == sorted(others)


def test_list_series_coverage_reports_each_series_range(candle_store):
    store.upsert_candles(*SERIES, minutes(2, 5))
    store.upsert_candles("binance", "ETH/USDT", "1m", minutes(1))

    assert store.list_series_coverage() == [
        ("binance", "BTC/USDT", "1m", T0 + 2 * MINUTE, T0 + 5 * MINUTE, 2),
        ("binance", "ETH/USDT", "1m", T0 + MINUTE, T0 + MINUTE, 1),
    ]


def test_delete_series_honours_bounds(candle_store):
    store.upsert_candles(*SERIES, minutes(0, 1, 2, 3))

    assert store.delete_series(*SERIES, start_ts=T0 + MINUTE, end_ts=T0 + 2 * MINUTE) == 2
    assert store.read_candles(*SERIES) == minutes(0, 3)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([T0, math.nan, 2.0, 1.0, 1.5, 1.0], "open must be a finite number"),
        ([T0, 1.0, math.inf, 1.0, 1.5, 1.0], "high must be a finite number"),
        ([T0, 1.0, 2.0, None, 1.5, 1.0], "low must be a finite number"),
        ([T0, 1.0, 2.0, 1.0, "1.5", 1.0], "close must be a finite number"),
        ([T0, 1.0, 2.0, 1.0, 1.5, True], "volume must be a finite number"),
        ([T0, 1.0, 2.0, 1.0, 1.5, -0.1], "volume must not be negative"),
        ([None, 1.0, 2.0, 1.0, 1.5, 1.0], "ts must be a non-negative integer"),
        ([T0 + 0.5, 1.0, 2.0, 1.0, 1.5, 1.0], "ts must be a non-negative integer"),
        ([-MINUTE, 1.0, 2.0, 1.0, 1.5, 1.0], "ts must be a non-negative integer"),
        ([T0, 1.0, 2.0, 1.0, 1.5], "is not a row [ts, open, high, low, close, volume]"),
        ("not a row", "is not a row"),
    ],
)
def test_a_row_that_is_not_a_candle_rejects_the_whole_call(candle_store, row, message):
    with pytest.raises(InvalidCandleError, match="candle #1") as error:
        store.upsert_candles(*SERIES, [candle(0), row, candle(2)])

    assert message in str(error.value)
    assert store.read_candles(*SERIES) == []


def test_odd_candles_are_stored_as_the_exchange_sent_them(candle_store):
    # Exchanges do publish these; the store is a record of what they said, not a judge of it.
    odd = [
        [T0, 10.0, 9.0, 11.0, 10.5, 1.0],  # high below low
        [T0 + MINUTE, 50.0, 12.0, 8.0, 5.0, 0.0],  # open and close outside [low, high], no volume
        [T0 + 2 * MINUTE, 0.0, 0.0, 0.0, 0.0, 0.0],  # an all-zero placeholder candle
        [T0 + 3 * MINUTE + 17, 1.0, 1.0, 1.0, 1.0, 1.0],  # off the minute grid
    ]

    assert store.upsert_candles(*SERIES, odd) == UpsertResult(4, 0, 0)
    assert store.read_candles(*SERIES) == odd


@pytest.mark.parametrize(
    ("exchange_id", "symbol", "timeframe"),
    [("", "BTC/USDT", "1m"), ("binance", "", "1m"), ("binance", "BTC/USDT", "1 minute"), ("binance", "BTC/USDT", "")],
)
def test_a_bad_series_name_is_rejected(candle_store, exchange_id, symbol, timeframe):
    with pytest.raises(ValueError, match=r"exchange_id|symbol|[Tt]imeframe"):
        store.upsert_candles(exchange_id, symbol, timeframe, [candle(0)])


def test_sql_store_upserts_large_inputs_in_batches(sql_store):
    # Sizes around the PostgreSQL batch (5,000) so that batch boundaries are crossed; kept to SQL
    # because mongomock-ng is slow with unique indexes.
    count = 2 * sqlstore.POSTGRES_BATCH + 123
    rows = [candle(i, close=100.0 + i % 97) for i in range(count)]

    assert store.upsert_candles(*SERIES, rows) == UpsertResult(count, 0, 0)
    assert store.upsert_candles(*SERIES, rows) == UpsertResult(0, 0, count)

    boundary = sqlstore.POSTGRES_BATCH
    revised = [candle(i, close=1.0) for i in (0, boundary - 1, boundary, count - 1)]
    assert store.upsert_candles(*SERIES, rows[:-1] + revised) == UpsertResult(0, 4, count - 4)
    assert store.coverage(*SERIES) == Coverage(T0, T0 + (count - 1) * MINUTE, count)
    assert store.read_candles(*SERIES, start_ts=T0 + boundary * MINUTE, limit=1) == [candle(boundary, close=1.0)]
    assert sum(1 for _ in store.iter_candles(*SERIES, chunk_size=4_000)) == count


def test_the_portable_fallback_gives_the_same_counts(sql_store):
    rows = [store.normalize_candles(minutes(0, 1, 2))][0]
    series = ("binance", "BTC/USDT", "1m")

    assert sqlstore.orm_upsert(*series, rows) == (3, 0, 0)
    revised = store.normalize_candles([*minutes(0, 2), candle(1, close=5.0), candle(3)])
    assert sqlstore.orm_upsert(*series, revised) == (1, 1, 2)
    assert store.read_candles(*series) == [*minutes(0), candle(1, close=5.0), *minutes(2), candle(3)]


def test_mongo_indexes_are_unique_on_the_series_key_and_ensured_idempotently(mongomock_store):
    db = mongostore.get_db()
    mongostore.ensure_indexes()
    mongostore.ensure_indexes()

    for collection in (mongostore.CANDLES, mongostore.INDICATORS):
        index = db[collection].index_information()["series_ts_unique"]
        assert index["unique"] is True
        assert [field for field, _ in index["key"]] == ["exchange_id", "symbol", "timeframe", "ts"]


def test_mongo_candles_are_plain_documents_named_by_field(mongomock_store):
    store.upsert_candles(*SERIES, [candle(0)])

    doc = mongostore.get_db()[mongostore.CANDLES].find_one({}, {"_id": 0})
    assert doc == {
        "exchange_id": "binance",
        "symbol": "BTC/USDT",
        "timeframe": "1m",
        "ts": T0,
        "open": 99.0,
        "high": 102.0,
        "low": 98.0,
        "close": 100.0,
        "volume": 1.0,
    }


def test_without_mongodb_uri_there_is_no_mongo_client(sql_store):
    from django.core.exceptions import ImproperlyConfigured

    assert store.backend_name() == "embedded (SQL)"
    with pytest.raises(ImproperlyConfigured, match="MONGODB_URI"):
        mongostore.get_db()


def test_rows_as_tuples_and_huge_finite_values_are_accepted(candle_store):
    huge = [T0, 1e308, 1.5e308, 1e308, 1.2e308, 1e308]  # their sum overflows; each value is finite
    as_tuple = (T0 + MINUTE, 1.0, 2.0, 0.5, 1.5, 3.0)

    assert store.upsert_candles(*SERIES, [huge, as_tuple]) == UpsertResult(2, 0, 0)
    assert store.read_candles(*SERIES) == [huge, list(as_tuple)]
