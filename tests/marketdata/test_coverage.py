"""Per-series statistics kept by the store with each write, and GET /api/v1/data/coverage built on them.

On PostgreSQL and mongomock-ng (the conftest's candle_store); the embedded SQLite store in a child process.
"""

import datetime as dt

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.urls import reverse
from rest_framework.test import APIClient

from apps.marketdata import mongostore, sqlstore, store
from apps.marketdata.models import Gap
from tests.conftest import grant
from tests.marketdata.conftest import run_on_sqlite

MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = ("binance", "BTC/USDT", "1m")
URL = "/api/v1/data/coverage"


def minutes(*indexes: int, close: float = 100.0) -> list[list]:
    return [[T0 + i * MINUTE, close, close + 1, close - 1, close, 1.0] for i in indexes]


def test_statistics_count_inserted_candles_only(db, candle_store):
    with time_machine.travel(dt.datetime(2024, 1, 2, tzinfo=dt.UTC), tick=False):
        store.upsert_candles(*SERIES, minutes(5, 6, 7))
        store.upsert_candles(*SERIES, minutes(6, 7, 8, close=50.0))  # two revisions, one new candle
        store.upsert_candles(*SERIES, minutes(2))  # before the first
        store.upsert_candles(*SERIES, minutes(2))  # unchanged

    stats = store.statistics(*SERIES)
    assert (stats.first_ts, stats.last_ts, stats.candles, stats.anomalies) == (T0 + 2 * MINUTE, T0 + 8 * MINUTE, 5, 0)
    assert stats.last_collected_at == dt.datetime(2024, 1, 2, tzinfo=dt.UTC)
    assert store.coverage(*SERIES).count == stats.candles


def test_an_upsert_in_several_batches_is_counted_whole(db, candle_store, monkeypatch):
    monkeypatch.setattr(sqlstore, "POSTGRES_BATCH", 300)
    monkeypatch.setattr(mongostore, "BATCH", 300)
    store.upsert_candles(*SERIES, minutes(*range(0, 1_000, 2)))
    store.upsert_candles(*SERIES, minutes(*range(0, 1_000)))

    stats = store.statistics(*SERIES)
    assert (stats.first_ts, stats.last_ts, stats.candles) == (T0, T0 + 999 * MINUTE, 1_000)


def test_deleting_candles_corrects_the_statistics(db, candle_store):
    store.upsert_candles(*SERIES, minutes(*range(10)))
    store.delete_series(*SERIES, end_ts=T0 + 2 * MINUTE)
    store.delete_series(*SERIES, start_ts=T0 + 9 * MINUTE)

    stats = store.statistics(*SERIES)
    assert (stats.first_ts, stats.last_ts, stats.candles) == (T0 + 3 * MINUTE, T0 + 8 * MINUTE, 6)
    store.delete_series(*SERIES)
    assert store.statistics(*SERIES) is None


def test_series_statistics_filter_sort_and_page(db, candle_store):
    for exchange_id, symbol, timeframe in [("okx", "ETH/USDT", "1h"), ("binance", "ETH/USDT", "1m"), SERIES]:
        store.upsert_candles(exchange_id, symbol, timeframe, minutes(0))

    keys = [(s.exchange_id, s.symbol, s.timeframe) for s in store.series_statistics()]
    assert keys == [SERIES, ("binance", "ETH/USDT", "1m"), ("okx", "ETH/USDT", "1h")]
    assert [s.exchange_id for s in store.series_statistics(symbol="ETH/USDT")] == ["binance", "okx"]
    assert [s.symbol for s in store.series_statistics(offset=1, limit=1)] == ["ETH/USDT"]
    assert store.count_series_statistics(exchange_id="binance") == 2


def test_rebuild_recomputes_statistics_and_anomalies_from_the_candles(db, candle_store):
    store.upsert_candles(*SERIES, [*minutes(0, 1), [T0 + 2 * MINUTE, 10.0, 9.0, 8.0, 9.5, 1.0]])
    store.upsert_candles("okx", "ETH/USDT", "1m", minutes(4))

    assert store.rebuild_statistics() == 2

    stats = store.statistics(*SERIES)
    assert (stats.first_ts, stats.last_ts, stats.candles, stats.anomalies) == (T0, T0 + 2 * MINUTE, 3, 1)
    assert store.statistics("okx", "ETH/USDT", "1m").candles == 1


def test_the_embedded_sqlite_store_keeps_statistics(tmp_path):
    script = """
import json, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from apps.marketdata import mongostore, sqlstore, store
S = ("binance", "BTC/USDT", "1m")
rows = lambda *ix: [[1704067200000 + i * 60000, 1.0, 2.0, 0.5, 1.5, 1.0] for i in ix]
store.upsert_candles(*S, rows(*range(0, 3000, 2)))
store.upsert_candles(*S, rows(*range(0, 3000)))
store.delete_series(*S, end_ts=1704067200000 + 9 * 60000)
s = store.statistics(*S)
print(json.dumps([s.first_ts, s.last_ts, s.candles, store.coverage(*S).count]))
"""
    assert run_on_sqlite(script, tmp_path / "db.sqlite3") == [T0 + 10 * MINUTE, T0 + 2999 * MINUTE, 2990, 2990]


@time_machine.travel(dt.datetime(2024, 1, 1, 0, 30, 20, tzinfo=dt.UTC), tick=False)
def test_coverage_reports_completeness_gaps_anomalies_and_freshness(api_client, candle_store):
    store.upsert_candles(
        *SERIES, [*minutes(*range(0, 10), *range(15, 21)), [T0 + 21 * MINUTE, 5.0, 4.0, 3.0, 5.0, 1.0]]
    )
    Gap.objects.create(
        exchange_id="binance",
        symbol="BTC/USDT",
        timeframe="1m",
        start_ts=T0 + 10 * MINUTE,
        end_ts=T0 + 12 * MINUTE,
        missing=3,
    )
    Gap.objects.create(
        exchange_id="binance",
        symbol="BTC/USDT",
        timeframe="1m",
        start_ts=T0 + 13 * MINUTE,
        end_ts=T0 + 14 * MINUTE,
        missing=2,
        status=Gap.Status.CONFIRMED_EMPTY,
    )

    response = api_client.get(URL)

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 1
    row = body["results"][0]
    assert row == {
        "exchange_id": "binance",
        "symbol": "BTC/USDT",
        "timeframe": "1m",
        "first_ts": T0,
        "first_time": "2024-01-01T00:00:00Z",
        "last_ts": T0 + 21 * MINUTE,
        "last_time": "2024-01-01T00:21:00Z",
        "candles": 17,
        "expected": 22,
        "completeness": round(17 / 22, 6),
        "open_gaps": 1,
        "missing": 3,
        "confirmed_empty": 2,
        "anomalies": 1,
        "last_collected_at": "2024-01-01T00:30:20Z",
        # At 00:30:20 the 00:30 candle is forming: the newest closed one opened at 00:29.
        "last_closed_ts": T0 + 29 * MINUTE,
        "lag_candles": 8,
        "lag_seconds": 8 * 60,
    }


def test_coverage_filters_and_pages(api_client, candle_store):
    for symbol in ("ADA/USDT", "BTC/USDT", "ETH/USDT"):
        store.upsert_candles("binance", symbol, "1m", minutes(0))
    store.upsert_candles("okx", "BTC/USDT", "1h", minutes(0))

    assert [r["symbol"] for r in api_client.get(URL, {"exchange_id": "binance"}).json()["results"]] == [
        "ADA/USDT",
        "BTC/USDT",
        "ETH/USDT",
    ]
    assert api_client.get(URL, {"symbol": "BTC/USDT", "timeframe": "1h"}).json()["results"][0]["exchange_id"] == "okx"
    page = api_client.get(URL, {"page_size": 2, "page": 2}).json()
    assert page["count"] == 4
    assert [(r["exchange_id"], r["symbol"]) for r in page["results"]] == [("binance", "ETH/USDT"), ("okx", "BTC/USDT")]
    assert page["next"] is None
    assert "page_size=2" in page["previous"]


def test_coverage_refuses_a_bad_timeframe_naming_it_and_needs_permission(api_client, sql_store):
    response = api_client.get(URL, {"timeframe": "one minute"})
    assert response.status_code == 400
    assert "timeframe" in response.json()
    assert api_client.get(URL, {"page": 7}).status_code == 404

    nobody = APIClient()
    nobody.force_authenticate(get_user_model().objects.create_user("nobody"))
    assert nobody.get(URL).status_code == 403
    viewer = APIClient()
    viewer.force_authenticate(grant(get_user_model().objects.create_user("viewer"), "view_candle"))
    assert viewer.get(URL).status_code == 200


def test_the_admin_series_page_shows_the_statistics(admin_client, sql_store):
    store.upsert_candles(*SERIES, [*minutes(0, 1, 3), [T0 + 4 * MINUTE, 5.0, 4.0, 3.0, 5.0, 1.0]])

    response = admin_client.get(reverse("admin:marketdata_series_overview"))

    assert response.status_code == 200
    html = response.content.decode()
    assert "BTC/USDT" in html
    assert "80.00%" in html
    assert reverse("admin:marketdata_anomaly_changelist") in html


@pytest.mark.parametrize("timeframe", ["1M", "1w"])
def test_calendar_and_weekly_series_count_their_own_slots(api_client, sql_store, timeframe):
    jan, mar = 1_704_067_200_000, 1_709_251_200_000  # 2024-01-01 (a Monday), 2024-03-01
    store.upsert_candles(
        "binance", "BTC/USDT", timeframe, [[jan, 1.0, 2.0, 0.5, 1.5, 1.0], [mar, 1.0, 2.0, 0.5, 1.5, 1.0]]
    )

    row = api_client.get(URL, {"timeframe": timeframe}).json()["results"][0]

    assert row["expected"] == (3 if timeframe == "1M" else 9)
