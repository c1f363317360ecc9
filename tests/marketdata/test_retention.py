"""Retention: periods per timeframe (collector.yaml) and per connector, the purge's boundary, the daily
purge task, and DELETE /api/v1/data/series. On PostgreSQL and mongomock-ng."""

import datetime as dt

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from apps.connectors.models import Connector
from apps.jobs.models import Task
from apps.jobs.tasks import run_task
from apps.marketdata import retention, store
from apps.marketdata.models import Anomaly, Gap
from datacollector.config import ConfigError, load_config
from tests.marketdata.conftest import BASE_CONFIG

MINUTE = 60_000
DAY = 86_400_000
NOW = dt.datetime(2024, 3, 1, 12, 0, 30, tzinfo=dt.UTC)
NOW_MS = int(NOW.timestamp() * 1000)
CUTOFF = NOW_MS - DAY  # retention.days {1m: 1}
SERIES = ("binance", "BTC/USDT", "1m")


def candle(ts: int, high: float = 2.0) -> list:
    return [ts, 1.0, high, 0.5, 1.5, 1.0]


def minute_grid(first: int, count: int) -> list[int]:
    # The grid through the cutoff: the candle opening exactly at the cutoff is one of them.
    return [first + i * MINUTE for i in range(count)]


def test_a_candle_at_the_cutoff_is_kept_one_before_it_is_deleted(db, candle_store, retention_config):
    retention_config({"1m": 1})
    stamps = minute_grid(CUTOFF - 3 * MINUTE, 6)
    store.upsert_candles(*SERIES, [candle(ts, high=0.9 if ts == CUTOFF - MINUTE else 2.0) for ts in stamps])
    store.upsert_candles(*SERIES, [candle(CUTOFF, high=0.9)])  # an anomaly at the cutoff, kept with its candle
    store.write_indicators(*SERIES, np.array(stamps), {"sma_2": np.arange(6, dtype=float)})
    Gap.objects.create(
        exchange_id="binance",
        symbol="BTC/USDT",
        timeframe="1m",
        start_ts=CUTOFF - 10 * MINUTE,
        end_ts=CUTOFF - 4 * MINUTE,
        missing=7,
    )
    straddling = Gap.objects.create(
        exchange_id="binance",
        symbol="BTC/USDT",
        timeframe="1m",
        start_ts=CUTOFF - 2 * MINUTE,
        end_ts=CUTOFF + 9 * MINUTE,
        missing=12,
    )
    store.upsert_candles("binance", "BTC/USDT", "1h", [candle(CUTOFF - 100 * DAY)])  # 1h keeps everything

    planned = retention.purge(now=NOW, dry_run=True)
    assert [(p.timeframe, p.cutoff_ts, p.candles) for p in planned] == [("1m", CUTOFF, 3)]
    assert len(store.read_candles(*SERIES)) == 6  # a dry run deletes nothing

    done = retention.purge(now=NOW)

    assert [(p.candles, p.indicators, p.gaps) for p in done] == [(3, 3, 1)]
    assert [row[0] for row in store.read_candles(*SERIES)] == stamps[3:]
    assert stamps[3] == CUTOFF
    assert [ts for ts, _ in store.read_indicators(*SERIES)] == stamps[3:]
    assert list(Anomaly.objects.values_list("ts", flat=True)) == [CUTOFF]
    straddling.refresh_from_db()
    assert (straddling.start_ts, straddling.missing) == (CUTOFF, 10)
    assert Gap.objects.count() == 1
    stats = store.statistics(*SERIES)
    assert (stats.first_ts, stats.last_ts, stats.candles, stats.anomalies) == (CUTOFF, stamps[-1], 3, 1)
    assert store.statistics("binance", "BTC/USDT", "1h").candles == 1
    assert retention.purge(now=NOW) == []  # nothing left to do


def test_a_connectors_period_replaces_the_timeframes(db, sql_store, retention_config):
    retention_config({"1m": 1})
    Connector.objects.create(exchange_id="binance", retention_days=3)
    store.upsert_candles(*SERIES, [candle(NOW_MS - 2 * DAY), candle(NOW_MS - 4 * DAY)])
    store.upsert_candles("okx", "BTC/USDT", "1m", [candle(NOW_MS - 2 * DAY)])

    done = retention.purge(now=NOW)

    assert sorted((p.exchange_id, p.days, p.candles) for p in done) == [("binance", 3, 1), ("okx", 1, 1)]
    assert [row[0] for row in store.read_candles(*SERIES)] == [NOW_MS - 2 * DAY]


def test_without_retention_nothing_is_purged(db, sql_store):
    store.upsert_candles(*SERIES, [candle(0)])
    assert retention.purge(now=NOW) == []
    assert store.statistics(*SERIES).candles == 1


@pytest.mark.parametrize(
    ("days", "message"),
    [
        ({"1 minute": 5}, "retention.days.1 minute: Timeframe '1 minute' is not well formed"),
        ({"1m": 0}, "greater than 0"),
    ],
)
def test_bad_retention_in_collector_yaml_is_refused_naming_the_key(tmp_path, days, message):
    path = tmp_path / "collector.yaml"
    path.write_text(BASE_CONFIG.read_text().replace("retention:\n  days: {}", f"retention:\n  days: {days!r}"))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_daily_purge_is_queued_once_a_day_and_runs_as_a_task(db, sql_store, retention_config):
    assert retention.schedule_daily_purge(NOW) is None  # no retention configured: nothing to queue
    retention_config({"1m": 1})
    store.upsert_candles(*SERIES, [candle(CUTOFF - MINUTE), candle(CUTOFF)])

    task = retention.schedule_daily_purge(NOW)
    assert task is not None
    assert retention.schedule_daily_purge(NOW + dt.timedelta(hours=11)) is None
    assert Task.objects.filter(kind=Task.Kind.PURGE).count() == 1
    assert retention.schedule_daily_purge(NOW + dt.timedelta(days=1)) is not None

    claimed = Task.objects.claim("test-worker", 60, kinds=[Task.Kind.PURGE])
    assert run_task(claimed) == Task.Status.SUCCEEDED
    claimed.refresh_from_db()
    assert claimed.result["series"] == 1
    assert claimed.result["candles"] >= 1  # the wall clock's cutoff is later than NOW's


def staff_client(is_staff: bool) -> APIClient:
    user = get_user_model().objects.create_user(f"user-{is_staff}", is_staff=is_staff)
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_delete_series_removes_everything_of_the_series_for_staff_only(db, candle_store):
    store.upsert_candles(*SERIES, [candle(0), candle(MINUTE, high=0.1), candle(3 * MINUTE)])
    store.write_indicators(*SERIES, np.array([0, MINUTE]), {"sma_2": np.array([1.0, 2.0])})
    Gap.objects.create(
        exchange_id="binance", symbol="BTC/USDT", timeframe="1m", start_ts=2 * MINUTE, end_ts=2 * MINUTE, missing=1
    )
    store.upsert_candles("binance", "ETH/USDT", "1m", [candle(0)])
    query = "exchange_id=binance&symbol=BTC/USDT&timeframe=1m"

    assert staff_client(False).delete(f"/api/v1/data/series?{query}").status_code == 403
    response = staff_client(True).delete(f"/api/v1/data/series?{query}")

    assert response.status_code == 200
    assert response.json() == {"candles": 3, "indicators": 2, "gaps": 1, "anomalies": 1}
    assert store.read_candles(*SERIES) == []
    assert store.read_indicators(*SERIES) == []
    assert store.statistics(*SERIES) is None
    assert not Gap.objects.exists()
    assert not Anomaly.objects.exists()
    assert store.statistics("binance", "ETH/USDT", "1m").candles == 1


def test_delete_series_needs_the_whole_key_and_an_existing_series(db, sql_store):
    client = staff_client(True)
    response = client.delete("/api/v1/data/series?exchange_id=binance&timeframe=fortnight")
    assert response.status_code == 400
    assert set(response.json()) == {"symbol", "timeframe"}
    assert client.delete("/api/v1/data/series?exchange_id=binance&symbol=X/Y&timeframe=1m").status_code == 404


def test_retention_days_is_set_through_the_connector_api(api_client, binance):
    url = f"/api/v1/connectors/{binance.pk}"
    assert api_client.patch(url, {"retention_days": 30}, format="json").json()["retention_days"] == 30
    response = api_client.patch(url, {"retention_days": 0}, format="json")
    assert response.status_code == 400
    assert "retention_days" in response.json()
