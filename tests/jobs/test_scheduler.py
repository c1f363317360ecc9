"""The scheduler's step, in process: outcomes, next-run alignment, backoff, leases."""

import random
import threading
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import OperationalError

from apps.connectors.models import Connector
from apps.jobs import models as job_models
from apps.jobs import outages
from apps.jobs.management.commands.run_scheduler import Scheduler
from apps.jobs.models import Job, LeaseLost, Run, backoff_seconds
from apps.marketdata.timeframes import next_candle_close
from tests.jobs import standins

NOW = datetime(2026, 3, 14, 15, 9, 26, 535000, tzinfo=UTC)


def make_scheduler(collector, worker_id: str = "test:1", **overrides) -> Scheduler:
    options = {
        "batch_size": 10,
        "lease_seconds": 60,
        "schedule_delay_seconds": 2.0,
        "backoff_base_seconds": 5.0,
        "backoff_max_seconds": 900.0,
    }
    options.update(overrides)
    return Scheduler(worker_id, collector, **options)


@pytest.fixture(params=["single-statement", "transaction"])
def release_path(request, monkeypatch) -> str:
    """Run a test through both release implementations: PostgreSQL's one statement and the portable one."""
    if request.param == "transaction":
        monkeypatch.setattr(job_models, "_can_release_in_one_statement", lambda using: False)
    return request.param


@pytest.fixture
def connector(db) -> Connector:
    return Connector.objects.create(exchange_id="simulated")


@pytest.fixture
def job(connector) -> Job:
    return Job.objects.create(connector=connector, symbol="BTC/USDT", timeframe="1h", next_run_at=NOW)


@pytest.mark.parametrize(
    ("timeframe", "expected"),
    [
        ("1m", datetime(2026, 3, 14, 15, 10, tzinfo=UTC)),
        ("5m", datetime(2026, 3, 14, 15, 10, tzinfo=UTC)),
        ("1h", datetime(2026, 3, 14, 16, 0, tzinfo=UTC)),
        ("4h", datetime(2026, 3, 14, 16, 0, tzinfo=UTC)),
        ("1d", datetime(2026, 3, 15, tzinfo=UTC)),
        ("1w", datetime(2026, 3, 16, tzinfo=UTC)),  # a Monday
        ("1M", datetime(2026, 4, 1, tzinfo=UTC)),
        ("3M", datetime(2026, 4, 1, tzinfo=UTC)),
    ],
)
def test_next_candle_close_is_aligned_to_the_timeframe_grid(timeframe, expected):
    assert next_candle_close(timeframe, NOW) == expected


def test_a_run_exactly_at_a_close_schedules_the_following_close():
    assert next_candle_close("1h", datetime(2026, 3, 14, 16, tzinfo=UTC)) == datetime(2026, 3, 14, 17, tzinfo=UTC)


@pytest.mark.parametrize(
    ("timeframe", "expected"),
    [
        ("1m", datetime(2026, 3, 14, 15, 10, 2, tzinfo=UTC)),
        ("1h", datetime(2026, 3, 14, 16, 0, 2, tzinfo=UTC)),
        ("1d", datetime(2026, 3, 15, 0, 0, 2, tzinfo=UTC)),
    ],
)
def test_success_schedules_next_candle_close_plus_delay(release_path, connector, timeframe, expected):
    job = Job.objects.create(connector=connector, symbol="ETH/USDT", timeframe=timeframe, next_run_at=NOW)
    with time_machine.travel(NOW, tick=False):
        assert make_scheduler(standins.instant).process_one()
    job.refresh_from_db()
    assert job.next_run_at == expected
    assert job.lease_owner == ""
    assert job.lease_expires_at is None
    assert job.last_success_at == NOW
    run = job.runs.get()
    assert run.status == Run.Status.SUCCESS
    assert (run.candles_fetched, run.candles_written, run.requests) == (1, 1, 1)
    assert run.finished_at == NOW


def test_backoff_doubles_with_equal_jitter_and_is_capped():
    rng = random.Random(7)
    for failures, ceiling in [(1, 5), (2, 10), (3, 20), (4, 40), (8, 640), (9, 900), (50, 900), (10_000, 900)]:
        for _ in range(20):
            delay = backoff_seconds(failures, base=5, cap=900, rng=rng)
            assert ceiling / 2 <= delay <= ceiling


def test_transient_failure_backs_off_and_counts_failures(release_path, job):
    scheduler = make_scheduler(standins.transient_failure)
    now = NOW
    with time_machine.travel(now, tick=False) as traveller:
        for failures, ceiling in [(1, 5), (2, 10), (3, 20)]:
            assert scheduler.process_one()
            job.refresh_from_db()
            assert job.consecutive_failures == failures
            assert job.status == Job.Status.ACTIVE
            assert "simulated outage" in job.last_error
            assert now + timedelta(seconds=ceiling / 2) <= job.next_run_at <= now + timedelta(seconds=ceiling)
            # Not due again before the backoff has passed: the worker does not hot-loop on it.
            assert not scheduler.process_one()
            now = job.next_run_at
            traveller.move_to(now)
    failed = list(job.runs.order_by("started_at").values_list("status", "error"))
    assert [status for status, _ in failed] == [Run.Status.FAILED] * 3
    assert all("simulated outage" in error for _, error in failed)


def test_success_after_failures_resets_the_failure_count(release_path, job):
    with time_machine.travel(NOW, tick=False):
        make_scheduler(standins.transient_failure).process_one()
    job.refresh_from_db()
    with time_machine.travel(job.next_run_at, tick=False):
        make_scheduler(standins.instant).process_one()
    job.refresh_from_db()
    assert job.consecutive_failures == 0
    assert job.last_error == ""


def test_retry_after_larger_than_backoff_is_honoured(job):
    with time_machine.travel(NOW, tick=False):
        make_scheduler(standins.transient_failure_with_retry_after).process_one()
    job.refresh_from_db()
    assert job.next_run_at == NOW + timedelta(seconds=3600)


def test_permanent_failure_stops_the_job_until_resumed(release_path, job):
    scheduler = make_scheduler(standins.permanent_failure)
    with time_machine.travel(NOW, tick=False):
        assert scheduler.process_one()
        job.refresh_from_db()
        assert job.status == Job.Status.ERROR
        assert job.last_error == "simulated does not list BTC/USDT"
        assert job.lease_owner == ""
        run = job.runs.get()
        assert (run.status, run.error) == (Run.Status.FAILED, "simulated does not list BTC/USDT")
    with time_machine.travel(NOW + timedelta(days=30), tick=False):
        assert not scheduler.process_one()
        job.resume()
        assert make_scheduler(standins.instant).process_one()
    job.refresh_from_db()
    assert job.status == Job.Status.ACTIVE
    assert job.runs.filter(status=Run.Status.SUCCESS).count() == 1


def test_a_crashing_collector_is_recorded_and_the_worker_goes_on(connector):
    jobs = [
        Job.objects.create(connector=connector, symbol=f"S{i}/USDT", timeframe="1m", next_run_at=NOW) for i in range(3)
    ]
    scheduler = make_scheduler(standins.crashing, batch_size=2)
    with time_machine.travel(NOW, tick=False):
        assert [scheduler.process_one() for _ in range(4)] == [True, True, True, False]
    for job in jobs:
        job.refresh_from_db()
        assert job.last_error == "RuntimeError: bug in the collector"
        assert job.next_run_at > NOW
    assert Run.objects.filter(status=Run.Status.FAILED).count() == 3


def test_more_history_schedules_the_job_again_at_once(job):
    def partial(job, run, heartbeat):
        return standins.CollectResult(candles_fetched=1000, candles_written=1000, requests=1, more=True)

    with time_machine.travel(NOW, tick=False):
        make_scheduler(partial).process_one()
    job.refresh_from_db()
    assert job.next_run_at == NOW


def test_heartbeat_renews_the_lease_and_raises_once_the_job_is_reclaimed(release_path, job):
    with time_machine.travel(NOW, tick=False) as traveller:
        (run,) = Job.objects.claim("a:1/0", 10, lease_seconds=60)
        run.begin(60)
        beat = run.heartbeat(60)
        traveller.shift(20)
        beat()
        job.refresh_from_db()
        assert job.lease_expires_at == NOW + timedelta(seconds=80)
        traveller.shift(61)
        (reclaimed,) = Job.objects.claim("b:2/0", 10, lease_seconds=60)
        traveller.shift(20)
        with pytest.raises(LeaseLost, match="a:1/0"):
            beat()
        with pytest.raises(LeaseLost):
            run.succeed(standins.CollectResult(), 2.0)
    run.refresh_from_db()
    assert (run.status, run.error) == (Run.Status.FAILED, "lease expired")
    job.refresh_from_db()
    assert job.lease_owner == "b:2/0"
    assert reclaimed.status == Run.Status.RUNNING


def test_heartbeat_is_throttled_to_a_fraction_of_the_lease(job, django_assert_num_queries):
    with time_machine.travel(NOW, tick=False) as traveller:
        (run,) = Job.objects.claim("a:1/0", 10, lease_seconds=60)
        beat = run.heartbeat(60)
        with django_assert_num_queries(0):
            for _ in range(100):
                beat()
        traveller.shift(15)
        with django_assert_num_queries(1):
            beat()
            beat()


def test_a_batch_job_reclaimed_while_waiting_is_skipped(connector):
    first = Job.objects.create(connector=connector, symbol="A/USDT", timeframe="1m", next_run_at=NOW)
    second = Job.objects.create(connector=connector, symbol="B/USDT", timeframe="1m", next_run_at=NOW)
    with time_machine.travel(NOW, tick=False) as traveller:
        runs = Job.objects.claim("a:1/0", 10, lease_seconds=30)
        traveller.shift(31)
        (taken,) = Job.objects.filter(pk=second.pk).claim("b:1/0", 10, lease_seconds=30)
        scheduler = make_scheduler(standins.instant)
        outcomes = [scheduler.execute(run) for run in runs]
    assert outcomes == ["success", "lease_lost"]
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.lease_owner == ""
    assert second.lease_owner == "b:1/0"
    assert taken.job_id == second.pk


def test_shutdown_releases_claimed_jobs_that_have_not_started(connector):
    for i in range(3):
        Job.objects.create(connector=connector, symbol=f"S{i}/USDT", timeframe="1m", next_run_at=NOW)
    stopping = threading.Event()

    def stop_after_first(job, run, heartbeat):
        stopping.set()
        return standins.CollectResult()

    scheduler = make_scheduler(stop_after_first, stopping=stopping)
    with time_machine.travel(NOW, tick=False):
        assert scheduler.process_one()
        assert Run.objects.count() == 3  # the whole batch is claimed
        scheduler.release_claimed()  # what each worker does when its loop ends
    assert Run.objects.count() == 1
    assert Run.objects.get().status == Run.Status.SUCCESS
    released = Job.objects.filter(next_run_at=NOW)
    assert released.count() == 2
    assert not released.exclude(lease_owner="").exists()
    with time_machine.travel(NOW, tick=False):
        assert Job.objects.due().count() == 2


def test_orphaned_run_of_a_paused_job_is_closed(job):
    with time_machine.travel(NOW, tick=False) as traveller:
        (run,) = Job.objects.claim("a:1/0", 10, lease_seconds=30)
        job.pause()
        assert Run.objects.close_orphaned() == 0  # the lease is still live
        traveller.shift(31)
        assert Run.objects.close_orphaned() == 1
    run.refresh_from_db()
    assert (run.status, run.error) == (Run.Status.FAILED, "lease expired")


def test_run_of_a_job_whose_lease_was_cleared_by_hand_is_closed(job):
    with time_machine.travel(NOW, tick=False):
        (run,) = Job.objects.claim("a:1/0", 10, lease_seconds=30)
        Job.objects.filter(pk=job.pk).update(lease_owner="", lease_expires_at=None)
        assert Run.objects.close_orphaned() == 1
        with pytest.raises(LeaseLost):
            run.succeed(standins.CollectResult(), 2.0)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED


@pytest.mark.django_db(transaction=True)
def test_release_outside_a_transaction_leaves_the_session_commit_mode_alone(connector):
    from django.db import connection

    job = Job.objects.create(connector=connector, symbol="BTC/USDT", timeframe="1h", next_run_at=NOW)
    with time_machine.travel(NOW, tick=False):
        assert make_scheduler(standins.instant).process_one()
    job.refresh_from_db()
    assert job.runs.get().status == Run.Status.SUCCESS
    assert job.lease_owner == ""
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"


@pytest.mark.django_db(transaction=True)
def test_workers_of_one_process_share_a_claimed_batch(connector):
    for i in range(2):
        Job.objects.create(connector=connector, symbol=f"S{i}/USDT", timeframe="1m")
    # Both jobs must be running at the same time to pass the barrier: one worker claims the batch,
    # the other takes the second job from it instead of idling.
    barrier = threading.Barrier(2, timeout=20)

    def together(job, run, heartbeat):
        barrier.wait()
        return standins.CollectResult(candles_written=1)

    scheduler = make_scheduler(together, batch_size=10)
    workers = [threading.Thread(target=scheduler.work, args=(True,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert list(Run.objects.values_list("status", flat=True)) == [Run.Status.SUCCESS] * 2


def test_a_claimed_batch_is_handed_to_the_next_free_worker_without_a_second_claim(connector):
    for i in range(2):
        Job.objects.create(connector=connector, symbol=f"S{i}/USDT", timeframe="1m")
    scheduler = make_scheduler(standins.instant, batch_size=10)
    first, second = scheduler.next_run(), scheduler.next_run()
    assert {first.job.symbol, second.job.symbol} == {"S0/USDT", "S1/USDT"}
    assert first.worker == second.worker  # one claim for both
    assert scheduler._running == 2


def test_concurrent_claims_of_one_process_never_take_more_than_its_free_workers(connector):
    for i in range(20):
        Job.objects.create(connector=connector, symbol=f"S{i}/USDT", timeframe="1m")
    scheduler = make_scheduler(standins.instant, batch_size=10, workers=4)
    with scheduler._lock:
        scheduler._running = 3  # three workers busy, one claim of theirs on its way
    assert scheduler.claim_limit() == 1
    run = scheduler.next_run()
    assert run is not None
    assert len(scheduler._queue) == 0  # the free worker claimed one job, for itself


def test_a_claim_takes_no_more_jobs_than_workers_free_to_start_them(connector):
    for i in range(6):
        Job.objects.create(connector=connector, symbol=f"S{i}/USDT", timeframe="1m", next_run_at=NOW)
    leased_while_running: list[int] = []

    def count_leased(job, run, heartbeat):
        leased_while_running.append(Job.objects.exclude(lease_owner="").count())
        return standins.CollectResult(candles_written=1)

    # Two workers: a claim leaves the other jobs due for another process's idle workers.
    scheduler = make_scheduler(count_leased, batch_size=10, workers=2)
    with time_machine.travel(NOW, tick=False):
        while scheduler.process_one():
            pass
    assert leased_while_running == [2, 1, 2, 1, 2, 1]
    assert Run.objects.filter(status=Run.Status.SUCCESS).count() == 6


def test_a_release_retried_after_it_landed_is_not_applied_twice(release_path, job):
    # A retry after a database outage cannot know whether its first attempt committed.
    with time_machine.travel(NOW, tick=False) as traveller:
        (run,) = Job.objects.claim("a:1/0", 10, lease_seconds=60)
        first = run.fail("boom", 5.0, 900.0)
        traveller.shift(1)
        run.fail("boom", 5.0, 900.0)
    job.refresh_from_db()
    assert (job.consecutive_failures, job.next_run_at, job.lease_owner) == (1, first, "")
    run.refresh_from_db()
    assert (run.status, run.error) == (Run.Status.FAILED, "boom")


@pytest.mark.django_db(transaction=True)  # ride_out drops the connection between attempts
def test_a_claim_whose_answer_was_lost_is_carried_on_with(connector, monkeypatch):
    jobs = [
        Job.objects.create(connector=connector, symbol=f"S{i}/USDT", timeframe="1m", next_run_at=NOW) for i in range(3)
    ]
    real_claim = job_models.JobQuerySet.claim
    attempts = []

    def claim_then_lose_the_answer(self, *args, **kwargs):
        # Stands in for a connection dropped between the claim's commit and its answer, which no
        # in-process test can produce on demand (tests/jobs/test_database_outage.py stops a real server).
        attempts.append(args)
        runs = real_claim(self, *args, **kwargs)
        if len(attempts) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return runs

    monkeypatch.setattr(job_models.JobQuerySet, "claim", claim_then_lose_the_answer)
    scheduler = make_scheduler(standins.instant, batch_size=3)
    with time_machine.travel(NOW, tick=False):
        claimed = scheduler._claim("a:1/0", 3)
    assert sorted(run.job_id for run in claimed) == [job.pk for job in jobs]
    assert len(attempts) == 1  # the retry found the committed claim instead of claiming again
    assert Run.objects.count() == 3


def test_releases_a_database_crash_forgot_are_applied_again_once_it_is_back(release_path, connector):
    for i in range(2):
        Job.objects.create(connector=connector, symbol=f"S{i}/USDT", timeframe="1m", next_run_at=NOW)
    scheduler = make_scheduler(standins.instant, batch_size=1)
    with time_machine.travel(NOW, tick=False):
        assert scheduler.process_one()
        assert scheduler.process_one()
    forgotten, kept = Run.objects.order_by("pk")
    # What a crash does to an asynchronously committed release (a real one: test_database_outage.py):
    # the job is still leased to the claim and its run still running.
    Job.objects.filter(pk=forgotten.job_id).update(lease_owner=forgotten.worker, lease_expires_at=NOW)
    Run.objects.filter(pk=forgotten.pk).update(status=Run.Status.RUNNING, finished_at=None)
    outages.availability.unavailable(OperationalError("the server crashed"))
    outages.availability.available()

    scheduler.replay_releases_after_outage()

    assert not Job.objects.exclude(lease_owner="").exists()
    assert list(Run.objects.order_by("pk").values_list("status", flat=True)) == [Run.Status.SUCCESS] * 2
    assert set(Job.objects.values_list("consecutive_failures", flat=True)) == {0}
    scheduler.replay_releases_after_outage()  # once per outage
    assert Run.objects.get(pk=kept.pk).status == Run.Status.SUCCESS


@pytest.mark.parametrize("outcome", ["success", "failure", "permanent"])
def test_a_release_leaves_the_jobs_committed_state_on_the_run(release_path, job, outcome):
    # The live hub publishes the job's new state from `run.job` without reading it back.
    scheduler = make_scheduler(standins.instant)
    with time_machine.travel(NOW, tick=False):
        run = scheduler.next_run()
        run.begin(scheduler.lease_seconds)
        if outcome == "success":
            run.succeed(None, 2.0)
        elif outcome == "failure":
            run.fail("timed out", 5, 900)
        else:
            run.fail_permanently("delisted")
    fields = ["status", "cursor", "next_run_at", "last_error", "consecutive_failures"]
    committed = Job.objects.values(*fields).get(pk=job.pk)
    assert {name: getattr(run.job, name) for name in fields} == committed
