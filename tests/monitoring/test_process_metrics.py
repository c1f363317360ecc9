"""ARCHITECTURE 8.1's metrics (`data_collector_*`): counted where the events happen, labels bounded."""

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db.models import F
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from apps.connectors import exchanges
from apps.connectors.models import Connector
from apps.jobs.collect import collect_job
from apps.jobs.models import Job, Run
from apps.marketdata import store
from apps.marketdata.gaps import sync_gaps
from apps.monitoring import metrics
from apps.monitoring.metrics import OTHER, SeriesLabels
from apps.ratelimits import models as ratelimit_models
from apps.ratelimits.models import RateLimit

pytestmark = pytest.mark.django_db

NOW = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def sql(settings):
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    exchanges.clear_clients()
    yield
    exchanges.clear_clients()


def test_ten_thousand_series_stay_within_the_limit_and_count_the_rest_as_other() -> None:
    labels = SeriesLabels(limit=100)
    exchanges_ = ["binance", "kraken", "okx"]
    seen = {labels(exchanges_[n % 3], f"C{n}/USDT", "1m") for n in range(10_000)}

    assert len(seen) == 100 + len(exchanges_)
    assert {(exchange, OTHER, OTHER) for exchange in exchanges_} <= seen
    # A series labelled before the limit keeps its own labels.
    assert labels("binance", "C0/USDT", "1m") == ("binance", "C0/USDT", "1m")
    assert labels("binance", "C9999/USDT", "1m") == ("binance", OTHER, OTHER)


def test_a_limit_of_zero_labels_per_exchange_only(settings) -> None:
    settings.METRICS_SERIES_LIMIT = 0
    labels = SeriesLabels()

    assert labels("binance", "BTC/USDT", "1m") == ("binance", OTHER, OTHER)


def test_a_collection_counts_its_candles_per_series_and_times_each_request(sql) -> None:
    connector = Connector.objects.create(exchange_id="simulated")
    job = Job.objects.create(connector=connector, symbol="ETH/USDT", timeframe="1h", since=NOW - timedelta(days=2))
    series = {"exchange": "simulated", "pair": "ETH/USDT", "timeframe": "1h"}
    candles_before = value("data_collector_candles_total", **series)
    requests_before = value("data_collector_fetch_duration_seconds_count", exchange="simulated")

    with time_machine.travel(NOW, tick=False):
        result = collect_job(job, Run.objects.create(job=job, worker="w"), lambda: None)

    assert result.candles_written == 47  # two days of closed 1h candles from 12:00 (the forming one is not)
    assert value("data_collector_candles_total", **series) - candles_before == 47
    assert value("data_collector_fetch_duration_seconds_count", exchange="simulated") - requests_before == (
        result.requests
    )


def test_gaps_found_are_counted_once_per_new_gap(sql) -> None:
    hour = 3_600_000
    rows = [[ts * hour, 1, 1, 1, 1, 1] for ts in (0, 1, 4, 5, 8)]  # holes at 2-3 and 6-7
    store.upsert_candles("binance", "XRP/USDT", "1h", rows)
    series = {"exchange": "binance", "pair": "XRP/USDT", "timeframe": "1h"}
    before = value("data_collector_gaps_detected_total", **series)

    sync_gaps("binance", "XRP/USDT", "1h")
    sync_gaps("binance", "XRP/USDT", "1h")  # the same gaps again: nothing new

    assert value("data_collector_gaps_detected_total", **series) - before == 2


def test_a_wait_for_the_shared_budget_is_counted(db, monkeypatch) -> None:
    RateLimit.objects.create(exchange_id="bitstamp", capacity=10, refill_per_second=4, tokens=0)
    before = value("data_collector_rate_limit_waits_total", exchange="bitstamp")

    # Mocked, as in tests/ratelimits: no real sleep in a unit test; time "passes" by moving the
    # bucket's last update back by the time slept.
    def fake_sleep(seconds: float) -> None:
        RateLimit.objects.filter(exchange_id="bitstamp").update(updated_at=F("updated_at") - timedelta(seconds=seconds))

    monkeypatch.setattr(ratelimit_models.time, "sleep", fake_sleep)
    RateLimit.objects.acquire("bitstamp", 2)

    assert value("data_collector_rate_limit_waits_total", exchange="bitstamp") - before == 1


def test_the_web_exports_the_job_queue_active_connectors_and_stalled_runs(client, simulated) -> None:
    Connector.objects.create(exchange_id="kraken", enabled=False)
    now = timezone.now()
    due = Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m", next_run_at=now)
    Job.objects.create(connector=simulated, symbol="ETH/USDT", timeframe="1m", next_run_at=now + timedelta(hours=1))
    held = Job.objects.create(
        connector=simulated, symbol="SOL/USDT", timeframe="1m", lease_owner="w/0", lease_expires_at=now + timedelta(1)
    )
    Run.objects.create(job=held, worker="w/0")  # its worker renews the lease: running, not stalled
    Run.objects.create(job=due, worker="gone/0")  # its job's lease has expired (none held): stalled

    response = client.get("/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.content.decode())
        for s in family.samples
    }

    assert samples[("data_collector_job_queue_size", ())] == 1
    assert samples[("data_collector_active_connectors", ())] == 1
    assert samples[("dc_runs_stalled", (("exchange", "simulated"),))] == 1
    assert samples[("dc_runs_running", (("exchange", "simulated"),))] == 2


def test_a_scheduler_serving_its_metrics_leaves_the_fleet_state_to_the_web() -> None:
    assert metrics._fleet is not None
    try:
        metrics.unregister()
        names = {family.name for family in REGISTRY.collect()}
        assert "dc_jobs" not in names
        assert "data_collector_candles" in names  # its own counts stay
    finally:
        metrics.register()
    assert "dc_jobs" in {family.name for family in REGISTRY.collect()}
