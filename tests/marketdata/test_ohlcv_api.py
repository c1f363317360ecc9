"""GET /api/v1/data/ohlcv: stored candles of one series, paged or streamed as CSV."""

import csv
import io

import pytest

from apps.marketdata import store

pytestmark = pytest.mark.django_db

URL = "/api/v1/data/ohlcv"
MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = {"exchange_id": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}


def store_minutes(count: int, first: int = 0) -> None:
    rows = [[T0 + i * MINUTE, 100.0 + i, 101.0 + i, 99.0 + i, 100.5 + i, 2.5] for i in range(first, first + count)]
    store.upsert_candles(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], rows)


def test_returns_the_stored_candles_as_rows(api_client, candle_store):
    store_minutes(3)

    response = api_client.get(URL, SERIES)

    assert response.status_code == 200
    body = response.json()
    assert (body["exchange_id"], body["symbol"], body["timeframe"]) == ("binance", "BTC/USDT", "1m")
    assert body["count"] == 3
    assert body["next"] is None
    assert body["results"][1] == {
        "ts": T0 + MINUTE,
        "time": "2024-01-01T00:01:00Z",
        "open": 101.0,
        "high": 102.0,
        "low": 100.0,
        "close": 101.5,
        "volume": 2.5,
    }
    assert [row["ts"] for row in body["results"]] == [T0, T0 + MINUTE, T0 + 2 * MINUTE]


def test_a_series_without_data_gives_an_empty_page(api_client, sql_store):
    response = api_client.get(URL, {**SERIES, "symbol": "ETH/USDT"})

    assert response.status_code == 200
    assert response.json()["results"] == []
    assert response.json()["next"] is None


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (str(T0 + MINUTE), str(T0 + 3 * MINUTE)),
        ("2024-01-01T00:01:00Z", "2024-01-01T00:03:00Z"),
        ("2024-01-01T00:01:00", "2024-01-01 00:03:00"),
        ("2024-01-01T01:01:00+01:00", "2024-01-01T00:03:00.000Z"),
    ],
)
def test_start_and_end_are_inclusive_in_ms_or_iso_8601(api_client, sql_store, start, end):
    store_minutes(6)

    response = api_client.get(URL, {**SERIES, "start": start, "end": end})

    assert response.status_code == 200, response.json()
    assert [row["ts"] for row in response.json()["results"]] == [T0 + i * MINUTE for i in (1, 2, 3)]


def test_a_date_means_midnight_utc(api_client, sql_store):
    store_minutes(3, first=24 * 60 - 1)  # 23:59 on Jan 1st, then 00:00 and 00:01 on Jan 2nd

    response = api_client.get(URL, {**SERIES, "start": "2024-01-02"})

    assert [row["time"] for row in response.json()["results"]] == ["2024-01-02T00:00:00Z", "2024-01-02T00:01:00Z"]


def test_next_pages_through_a_range_without_gaps_or_repeats(api_client, sql_store):
    store_minutes(25)
    seen, pages = [], 0
    response = api_client.get(URL, {**SERIES, "limit": 10, "end": T0 + 22 * MINUTE})
    while True:
        body = response.json()
        pages += 1
        seen.extend(row["ts"] for row in body["results"])
        if body["next"] is None:
            break
        assert "limit=10" in body["next"]
        assert f"end={T0 + 22 * MINUTE}" in body["next"]
        response = api_client.get(body["next"])

    assert pages == 3
    assert seen == [T0 + i * MINUTE for i in range(23)]


def test_a_range_ending_on_a_page_boundary_has_no_empty_last_page(api_client, sql_store):
    store_minutes(20)

    first = api_client.get(URL, {**SERIES, "limit": 10}).json()
    second = api_client.get(first["next"]).json()

    assert second["count"] == 10
    assert second["next"] is None


def test_limit_defaults_to_a_thousand(api_client, sql_store):
    store_minutes(1_001)

    body = api_client.get(URL, SERIES).json()

    assert body["count"] == 1_000
    assert f"start={T0 + 999 * MINUTE + 1}" in body["next"]


def test_csv_streams_the_whole_range(api_client, candle_store):
    store_minutes(12)

    response = api_client.get(URL, {**SERIES, "format": "csv", "start": T0 + 2 * MINUTE})

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="binance-BTCUSDT-1m.csv"' in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["ts", "time", "open", "high", "low", "close", "volume"]
    assert rows[1] == [str(T0 + 2 * MINUTE), "2024-01-01T00:02:00Z", "102.0", "103.0", "101.0", "102.5", "2.5"]
    assert len(rows) == 1 + 10


def test_csv_honours_an_explicit_limit(api_client, sql_store):
    store_minutes(12)

    response = api_client.get(URL, {**SERIES, "format": "csv", "limit": 5})

    assert len(b"".join(response.streaming_content).decode().splitlines()) == 1 + 5


def test_csv_errors_are_a_400_in_csv(api_client, sql_store):
    response = api_client.get(URL, {**SERIES, "format": "csv", "timeframe": "weekly"})

    assert response.status_code == 400
    lines = response.content.decode().splitlines()
    assert lines[0] == "field,error"
    assert lines[1].startswith("timeframe,")


@pytest.mark.parametrize("output", ["json", "csv"])
def test_an_unreachable_mongodb_is_a_503_not_a_500(api_client, settings, output):
    # A real pymongo client pointed at a closed local port: nothing listens on 127.0.0.1:9.
    settings.MONGODB_URI = "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200&connectTimeoutMS=200"
    store.reset_mongo_client()
    try:
        response = api_client.get(URL, {**SERIES, "format": output})
    finally:
        store.reset_mongo_client()

    assert response.status_code == 503
    assert "unavailable" in response.content.decode()
