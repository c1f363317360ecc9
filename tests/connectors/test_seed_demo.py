from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core.management import call_command

from apps.connectors.models import Connector
from apps.jobs.models import Job

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.django_db
@time_machine.travel(NOW, tick=False)
def test_seed_demo_creates_a_simulated_connector_and_active_jobs_once() -> None:
    call_command("seed_demo", stdout=None)
    Job.objects.filter(symbol="BTC/USDT", timeframe="1m").update(status=Job.Status.PAUSED)
    call_command("seed_demo")

    connector = Connector.objects.get()
    assert connector.exchange_id == "simulated"
    assert set(Job.objects.values_list("symbol", "timeframe")) == {
        ("BTC/USDT", "1m"),
        ("BTC/USDT", "1h"),
        ("ETH/USDT", "1m"),
        ("ETH/USDT", "1h"),
    }
    # A second run changes nothing, not even an operator's pause.
    assert Job.objects.get(symbol="BTC/USDT", timeframe="1m").status == Job.Status.PAUSED
    assert Job.objects.get(symbol="ETH/USDT", timeframe="1m").since == NOW - timedelta(hours=6)
    assert all(job.full_clean() is None for job in Job.objects.all())
