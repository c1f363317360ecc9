"""The web's /metrics reports fleet-wide state read from the shared database."""

from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from apps.jobs.models import Job
from apps.marketdata.models import Gap
from apps.ratelimits.models import RateLimit

pytestmark = pytest.mark.django_db


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_job_states_overdue_and_failing_jobs_are_counted_per_exchange(client, simulated) -> None:
    now = timezone.now()
    Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m", next_run_at=now - timedelta(hours=1))
    Job.objects.create(connector=simulated, symbol="ETH/USDT", timeframe="1m", consecutive_failures=2)
    Job.objects.create(connector=simulated, symbol="SOL/USDT", timeframe="1m", status=Job.Status.ERROR)

    samples = scrape(client)

    assert samples[("dc_jobs", (("exchange", "simulated"), ("status", "active")))] == 2
    assert samples[("dc_jobs", (("exchange", "simulated"), ("status", "error")))] == 1
    assert samples[("dc_jobs_overdue", (("exchange", "simulated"),))] == 1
    assert samples[("dc_jobs_failing", (("exchange", "simulated"),))] == 1
    assert samples[("dc_database_up", ())] == 1


def test_bucket_counters_blocks_circuits_and_gaps_are_exported(client) -> None:
    now = timezone.now()
    RateLimit.objects.create(
        exchange_id="binance",
        capacity=300,
        refill_per_second=90,
        tokens=12,
        granted=7,
        denied=3,
        tokens_used=14,
        wait_seconds=1.5,
        blocked_until=now + timedelta(seconds=30),
        circuit_open_until=now - timedelta(seconds=1),
    )
    Gap.objects.create(exchange_id="binance", symbol="BTC/USDT", timeframe="1m", start_ts=0, end_ts=240_000, missing=5)

    samples = scrape(client)

    key = (("exchange", "binance"),)
    assert samples[("dc_bucket_granted_total", key)] == 7
    assert samples[("dc_bucket_denied_total", key)] == 3
    assert samples[("dc_bucket_tokens_used_total", key)] == 14
    assert samples[("dc_bucket_wait_seconds_total", key)] == 1.5
    assert samples[("dc_bucket_tokens", key)] == 12
    assert samples[("dc_exchange_blocked", key)] == 1
    assert samples[("dc_circuit_open", key)] == 0
    assert samples[("dc_gap_missing_candles", key)] == 5
