"""GET /api/v1/data/indicators: one row per candle with a column per configured indicator."""

import csv
import io

import numpy as np
import pytest
import talib
from django.contrib.auth import get_user_model

from apps.marketdata import store
from apps.marketdata.indicators import indicator_set, update_indicators
from datacollector.config import get_config
from tests.conftest import grant
from tests.marketdata.test_indicators import random_walk

pytestmark = pytest.mark.django_db

URL = "/api/v1/data/indicators"
MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = {"exchange_id": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}
DEFAULT_COLUMNS = [
    "sma_20",
    "sma_50",
    "sma_200",
    "ema_12",
    "ema_26",
    "ema_50",
    "rsi_14",
    "macd",
    "macd_signal",
    "macd_hist",
    "bb_upper",
    "bb_middle",
    "bb_lower",
]


@pytest.fixture
def user(db):
    # The API client logs in with force_authenticate, so skip hashing a password.
    return grant(get_user_model().objects.create_user("reader", password=None), "view_indicatorrow")


@pytest.fixture(autouse=True)
def fresh_config():
    get_config.cache_clear()
    yield
    get_config.cache_clear()


def store_series(count: int) -> np.ndarray:
    close = random_walk(n=count, seed=3)
    rows = [[T0 + i * MINUTE, c, c, c, c, 1.0] for i, c in enumerate(close.tolist())]
    store.upsert_candles(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], rows)
    update_indicators(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], T0)
    return close


def test_rows_have_ts_time_and_one_column_per_configured_indicator(api_client, sql_store):
    close = store_series(800)

    response = api_client.get(URL, {**SERIES, "start": T0 + 100 * MINUTE, "limit": 700})

    assert response.status_code == 200
    body = response.json()
    assert body["columns"] == DEFAULT_COLUMNS
    assert (body["exchange_id"], body["symbol"], body["timeframe"]) == ("binance", "BTC/USDT", "1m")
    assert body["count"] == 700
    first = body["results"][0]
    assert list(first) == ["ts", "time", *DEFAULT_COLUMNS]
    assert (first["ts"], first["time"]) == (T0 + 100 * MINUTE, "2024-01-01T01:40:00Z")
    assert first["sma_20"] == pytest.approx(close[81:101].mean(), rel=1e-12)
    assert first["ema_50"] is None  # not yet equal to the textbook EMA
    last = body["results"][-1]
    assert last["rsi_14"] == pytest.approx(talib.RSI(close, 14)[799], abs=1e-8)
    assert last["macd_signal"] == pytest.approx(talib.MACD(close)[1][799], rel=1e-8)


def test_each_backend_serves_the_stored_rows(api_client, candle_store):
    # Small: mongomock-ng upserts get slow with size.
    close = store_series(40)

    rows = api_client.get(URL, {**SERIES, "start": T0 + 18 * MINUTE, "end": T0 + 20 * MINUTE}).json()["results"]

    assert [row["sma_20"] for row in rows] == [
        None,
        pytest.approx(close[:20].mean()),
        pytest.approx(close[1:21].mean()),
    ]
    assert {row["rsi_14"] for row in rows} == {None}


def test_stable_from_rows_are_where_the_null_prefix_ends(api_client, sql_store):
    store_series(800)
    rows = api_client.get(URL, {**SERIES, "limit": 800}).json()["results"]
    for column in indicator_set().columns:
        values = [row[column.name] for row in rows]
        first = next(i for i, value in enumerate(values) if value is not None)
        assert first == column.stable_from + column.changes, column.name
        assert None not in values[first:]


def test_columns_follow_the_config_even_before_a_recompute(api_client, sql_store, settings, tmp_path):
    store_series(30)
    path = tmp_path / "collector.yaml"
    path.write_text(
        "rate_limits:\n  default: {weight_per_minute: 1200, burst: 20}\n"
        "indicators:\n  sma: [20, 5]\n  ema: []\n  rsi: []\n  macd: []\n  bollinger: []\n"
    )
    settings.COLLECTOR_CONFIG = path
    get_config.cache_clear()

    body = api_client.get(URL, SERIES).json()

    assert body["columns"] == ["sma_20", "sma_5"]
    assert body["results"][29]["sma_20"] is not None
    assert body["results"][29]["sma_5"] is None  # configured, but not computed until recompute_indicators


def test_a_series_without_indicators_gives_an_empty_page(api_client, sql_store):
    body = api_client.get(URL, SERIES).json()
    assert body["results"] == []
    assert body["next"] is None


def test_next_pages_through_a_range_without_gaps_or_repeats(api_client, sql_store):
    store_series(25)
    seen = []
    response = api_client.get(URL, {**SERIES, "limit": 10, "end": T0 + 22 * MINUTE})
    while True:
        body = response.json()
        seen.extend(row["ts"] for row in body["results"])
        if body["next"] is None:
            break
        response = api_client.get(body["next"])
    assert seen == [T0 + i * MINUTE for i in range(23)]


def test_csv_streams_the_range_with_empty_cells_for_null(api_client, candle_store):
    store_series(30)

    response = api_client.get(URL, {**SERIES, "format": "csv", "start": T0 + 18 * MINUTE})

    assert response.status_code == 200
    assert response.streaming
    assert 'filename="binance-BTCUSDT-1m-indicators.csv"' in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["ts", "time", *DEFAULT_COLUMNS]
    assert len(rows) == 1 + 12
    assert rows[1][:3] == [str(T0 + 18 * MINUTE), "2024-01-01T00:18:00Z", ""]  # sma_20 starts at candle 19
    assert rows[2][2] != ""


def test_csv_errors_are_a_400_in_csv(api_client, sql_store):
    response = api_client.get(URL, {**SERIES, "format": "csv", "limit": "0"})

    assert response.status_code == 400
    assert response.content.decode().splitlines()[0] == "field,error"
