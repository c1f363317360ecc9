"""GET /api/v1/data/ohlcv?format=parquet: one series as a Parquet file, streamed, read back with pyarrow."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apps.marketdata import exports, store

pytestmark = pytest.mark.django_db

URL = "/api/v1/data/ohlcv"
MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = {"exchange_id": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}


def store_minutes(count: int) -> list[list]:
    rows = [[T0 + i * MINUTE, 100.0 + i, 101.0 + i, 99.0 + i, 100.5 + i, 2.5] for i in range(count)]
    store.upsert_candles(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], rows)
    return rows


def read_body(response) -> pa.Table:
    return pq.read_table(io.BytesIO(b"".join(response.streaming_content)))


def test_parquet_streams_the_range_with_utc_ms_timestamps_and_float64_values(api_client, candle_store):
    rows = store_minutes(12)

    response = api_client.get(URL, {**SERIES, "format": "parquet", "start": T0 + 2 * MINUTE})

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "application/vnd.apache.parquet"
    assert 'filename="binance-BTCUSDT-1m.parquet"' in response["Content-Disposition"]
    table = read_body(response)
    assert table.schema.names == ["ts", "open", "high", "low", "close", "volume"]
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert {table.schema.field(name).type for name in table.schema.names[1:]} == {pa.float64()}
    assert table.column("ts").cast(pa.int64()).to_pylist() == [row[0] for row in rows[2:]]
    assert table.column("high").to_pylist() == [row[2] for row in rows[2:]]


def test_parquet_is_a_row_group_per_chunk_and_honours_an_explicit_limit(api_client, sql_store, monkeypatch):
    store_minutes(12)
    chunked = exports.series_tables
    monkeypatch.setattr(exports, "series_tables", lambda *args: chunked(*args, chunk_size=4))

    response = api_client.get(URL, {**SERIES, "format": "parquet", "limit": 6})

    parquet = pq.ParquetFile(io.BytesIO(b"".join(response.streaming_content)))
    assert (parquet.metadata.num_rows, parquet.metadata.num_row_groups) == (6, 2)
    assert parquet.read().column("ts").cast(pa.int64()).to_pylist() == [T0 + i * MINUTE for i in range(6)]


def test_an_empty_range_is_a_parquet_file_without_rows(api_client, sql_store):
    response = api_client.get(URL, {**SERIES, "format": "parquet", "symbol": "ETH/USDT"})

    assert response.status_code == 200
    table = read_body(response)
    assert (table.num_rows, table.schema.field("ts").type) == (0, pa.timestamp("ms", tz="UTC"))


def test_parquet_errors_are_a_400_in_json_naming_the_field(api_client, sql_store):
    response = api_client.get(URL, {**SERIES, "format": "parquet", "timeframe": "weekly"})

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert list(response.json()) == ["timeframe"]


def test_the_indicators_endpoint_offers_no_parquet(api_client, sql_store):
    response = api_client.get("/api/v1/data/indicators", {**SERIES, "format": "parquet"})

    assert response.status_code == 400
    assert "use json or csv" in response.json()["format"][0]


def test_an_unreachable_mongodb_is_a_503_in_json(api_client, settings):
    # A real pymongo client pointed at a closed local port: nothing listens on 127.0.0.1:9.
    settings.MONGODB_URI = "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200&connectTimeoutMS=200"
    store.reset_mongo_client()
    try:
        response = api_client.get(URL, {**SERIES, "format": "parquet"})
    finally:
        store.reset_mongo_client()

    assert response.status_code == 503
    assert "unavailable" in response.json()["detail"]
