"""The admin's chart of a stored series: candles, volume, indicator overlays and RSI as server-side SVG."""

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


def store_hours(count: int, missing: range = range(0)) -> None:
    rows = []
    for i in range(count):
        if i in missing:
            continue
        close = 100 + 10 * math.sin(i / 20)
        rows.append([T0 + i * HOUR, close - 0.5, close + 1, close - 1, close, 10.0 + i % 7])
    store.upsert_candles(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], rows)


def candles_drawn(content: str) -> int:
    return len(re.findall(r'<g class="(?:up|down)"><title>', content))


def test_draws_the_newest_candles_with_volume_overlays_and_rsi(admin_client, sql_store) -> None:
    store_hours(600, missing=range(590, 594))
    update_indicators(SERIES["exchange_id"], SERIES["symbol"], SERIES["timeframe"], T0)

    response = admin_client.get(URL, {**SERIES, "candles": 100})

    assert response.status_code == 200
    content = response.content.decode()
    assert candles_drawn(content) == 96  # 100 slots, 4 of them a hole in the data
    assert "sma_20" in content
    assert "bb_upper" in content
    assert "rsi_14 (lower panel)" in content
    assert "<svg" in content


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
