"""Job.objects.claim on PostgreSQL outside a transaction: one statement that locks, leases, closes the runs
of expired leases and creates the Runs (the scheduler's path; tests in a transaction take the other)."""

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from django.db import connection

from apps.connectors.models import Connector
from apps.jobs.models import Job, Run

pytestmark = pytest.mark.django_db(transaction=True)

NOW = datetime(2026, 3, 14, 15, 7, tzinfo=UTC)


@pytest.fixture
def jobs() -> list[Job]:
    connector = Connector.objects.create(exchange_id="simulated")
    return [
        Job.objects.create(
            connector=connector, symbol=symbol, timeframe="1m", next_run_at=NOW - timedelta(seconds=10 - n)
        )
        for n, symbol in enumerate(["BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT"])
    ]


def test_a_claim_leases_the_oldest_due_jobs_and_starts_their_runs(jobs):
    runs = Job.objects.claim("a:1/0", 3, lease_seconds=60, now=NOW)
    assert [run.job.symbol for run in runs] == ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
    assert all(run.job.connector.exchange_id == "simulated" for run in runs)  # read with the claim
    for run in runs:
        stored = Run.objects.get(pk=run.pk)
        assert (stored.status, stored.worker, stored.started_at, stored.job_id) == (
            Run.Status.RUNNING,
            "a:1/0",
            NOW,
            run.job.pk,
        )
        assert (run.job.lease_owner, run.job.lease_expires_at, run.job.last_run_at) == (
            "a:1/0",
            NOW + timedelta(seconds=60),
            NOW,
        )
    assert Job.objects.claim("b:1/0", 10, lease_seconds=60, now=NOW)[0].job.symbol == "XRP/USDT"
    assert Job.objects.claim("b:1/1", 10, lease_seconds=60, now=NOW) == []


def test_a_claim_closes_the_run_left_by_an_expired_lease(jobs):
    (first,) = Job.objects.claim("a:1/0", 1, lease_seconds=30, now=NOW)
    later = NOW + timedelta(seconds=31)
    (again,) = Job.objects.filter(pk=first.job.pk).claim("b:1/0", 1, lease_seconds=30, now=later)
    assert again.job.pk == first.job.pk
    assert again.pk != first.pk
    abandoned = Run.objects.get(pk=first.pk)
    assert (abandoned.status, abandoned.error, abandoned.finished_at) == (Run.Status.FAILED, Run.LEASE_EXPIRED, later)
    assert Run.objects.get(pk=again.pk).status == Run.Status.RUNNING


def test_a_job_locked_by_another_claim_is_skipped_for_the_next_one(jobs):
    params = connection.get_connection_params()
    with psycopg.connect(**params) as other:
        other.execute("SELECT id FROM jobs_job WHERE id = %s FOR UPDATE", [jobs[0].pk])
        (run,) = Job.objects.claim("a:1/0", 1, lease_seconds=60, now=NOW)
        assert run.job.pk == jobs[1].pk
        other.rollback()


def test_concurrent_claims_never_share_a_job(jobs):
    connector = jobs[0].connector
    Job.objects.bulk_create(
        Job(connector=connector, symbol=f"S{n:03d}/USDT", timeframe="1m", next_run_at=NOW) for n in range(60)
    )
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        try:
            for attempt in range(1_000):
                runs = Job.objects.claim(f"{name}/{attempt}", 3, lease_seconds=60, now=NOW)
                if not runs:
                    return
                with lock:
                    claimed.extend(run.job.pk for run in runs)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(Job.objects.values_list("pk", flat=True))
    assert Run.objects.count() == len(claimed)
