"""The admin's chart of a stored series: the data lightweight-charts draws (candles, volume, indicators), the
warm-up notes, and the library served from the project's own static files."""

import json
import math
import re

import pytest
from django.urls import reverse

from apps.marketdata import store
from apps.marketdata.indicators import update_indicators

HOUR = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = {"exchange_id": "binance", "symbol": "BTC/USDT", "timeframe": "1h"}
URL = reverse("admin:marketdata_series_chart")


def store_hours(count: int, missing: range = range(0)) -> list[list[float]]:
    rows = []
    for i in range(count):
        if i in missing:
            continue
        close = 100 + 10 * math.sin(i / 20)
        rows.append([T0 + i * HOUR, close - 0.5, close + 1, close - 1, close, 10.0 + i % 7])
    store.upsert_candles(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], rows)
    return rows


def chart_data(content: str) -> dict:
    return json.loads(re.search(r'<script id="chart-data" type="application/json">(.*?)</script>', content, re.S)[1])


def candles_drawn(content: str) -> int:
    return len(chart_data(content)["candles"])


def test_draws_the_newest_candles_with_volume_overlays_and_rsi(admin_client, sql_store) -> None:
    rows = store_hours(600, missing=range(590, 594))
    update_indicators(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], T0)

    response = admin_client.get(URL, {**SERIES, "candles": 100})

    assert response.status_code == 200
    content = response.content.decode()
    data = chart_data(content)
    assert len(data["candles"]) == 96  # 100 slots, 4 of them a hole in the data
    assert data["candles"][-1] == {
        "time": (T0 + 599 * HOUR) // 1000,
        **dict(zip(("open", "high", "low", "close", "volume"), rows[-1][1:], strict=True)),
    }
    assert {"sma_20", "bb_upper", "ema_12"} <= set(data["overlays"])
    assert "rsi_14" in data["panes"]
    assert 'data-indicator="sma_20" checked' in content  # overlays can be switched on and off
    assert "vendor/lightweight-charts/lightweight-charts.standalone.production.js" in content
    assert "marketdata/chart.js" in content


def test_says_why_an_indicator_is_blank_during_its_warm_up(admin_client, sql_store) -> None:
    store_hours(30)
    update_indicators(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], T0)

    data = chart_data(admin_client.get(URL, SERIES).content.decode())

    # SMA 20 starts at the 20th candle; the points before it are blank (time only), and the page says why.
    sma = data["indicators"]["sma_20"]
    assert [point.get("value") is None for point in sma] == [True] * 19 + [False] * 11
    assert data["warmup"]["sma_20"] == "blank until candle 20 of the series: it needs a full window of closes"
    assert data["warmup"]["ema_12"].startswith("blank until candle 164 of the series")
    assert "Why an indicator is blank (warm-up)" in admin_client.get(URL, SERIES).content.decode()


def test_defaults_to_300_slots_and_reports_an_empty_series(admin_client, sql_store) -> None:
    store_hours(400)

    assert candles_drawn(admin_client.get(URL, SERIES).content.decode()) == 300
    empty = admin_client.get(URL, {**SERIES, "symbol": "ETH/USDT"})
    assert empty.status_code == 200
    assert "No candles stored for binance ETH/USDT 1h" in empty.content.decode()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({**SERIES, "timeframe": "hourly"}, "timeframe: Timeframe &#x27;hourly&#x27; is not well formed"),
        ({**SERIES, "candles": 5}, "candles: Ensure this value is greater than or equal to 10"),
        ({"exchange_id": "binance"}, "symbol: This field is required"),
    ],
)
def test_bad_parameters_are_form_errors_naming_the_field(admin_client, db, params, message) -> None:
    response = admin_client.get(URL, params)

    assert response.status_code == 200
    assert message in response.content.decode()


def test_overview_links_each_series_to_its_chart_and_anonymous_users_must_log_in(admin_client, client, sql_store):
    store_hours(3)

    overview = admin_client.get(reverse("admin:marketdata_series_overview")).content.decode()
    assert f"{URL}?exchange_id=binance&symbol=BTC/USDT&timeframe=1h" in overview
    anonymous = client.get(URL, SERIES)
    assert anonymous.status_code == 302
    assert "/admin/login/" in anonymous["Location"]
