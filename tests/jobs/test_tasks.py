"""Background tasks (`Task`): enqueue, claim with SKIP LOCKED and a lease, progress, outcome, run_task."""

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import time_machine
from django.db import connection

from apps.jobs import tasks
from apps.jobs.management.commands.run_scheduler import Scheduler
from apps.jobs.models import Task, TaskLost
from apps.jobs.tasks import run_task
from tests.jobs import standins

NOW = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)


def succeeding_handler(task: Task) -> dict:
    task.report(0.5, "half way")
    return {"rows": task.params.get("rows", 0)}


def crashing_handler(task: Task) -> dict:
    raise ValueError("no such series")


def cancelled_midway_handler(task: Task) -> dict:
    Task.objects.get(pk=task.pk).cancel()
    task.report(0.9, force=True)
    return {"never": "recorded"}


@pytest.fixture
def handlers(monkeypatch) -> dict[str, str]:
    """Point the task kinds at this module's handlers (HANDLERS is the one registry; patched per test)."""
    monkeypatch.setitem(tasks.HANDLERS, Task.Kind.EXPORT, f"{__name__}.succeeding_handler")
    monkeypatch.setitem(tasks.HANDLERS, Task.Kind.PURGE, f"{__name__}.crashing_handler")
    monkeypatch.setitem(tasks.HANDLERS, Task.Kind.INDICATORS, f"{__name__}.cancelled_midway_handler")
    return tasks.HANDLERS


@pytest.mark.django_db
def test_claim_takes_the_oldest_pending_task_and_leases_it(user):
    with time_machine.travel(NOW, tick=False):
        first = Task.objects.enqueue(Task.Kind.EXPORT, {"n": 1}, user=user)
    with time_machine.travel(NOW + timedelta(seconds=1), tick=False):
        Task.objects.enqueue(Task.Kind.EXPORT, {"n": 2})
        claimed = Task.objects.claim("w1", lease_seconds=30)
    assert claimed.pk == first.pk
    assert (claimed.status, claimed.lease_owner, claimed.attempts) == (Task.Status.RUNNING, "w1", 1)
    assert claimed.lease_expires_at == NOW + timedelta(seconds=31)
    assert claimed.started_at == NOW + timedelta(seconds=1)
    assert claimed.created_by == user


@pytest.mark.django_db
def test_claim_returns_none_when_nothing_is_pending():
    Task.objects.enqueue(Task.Kind.EXPORT, {})
    assert Task.objects.claim("w1", 30) is not None
    assert Task.objects.claim("w2", 30) is None


@pytest.mark.django_db
def test_claim_can_be_limited_to_kinds():
    Task.objects.enqueue(Task.Kind.EXPORT, {})
    purge = Task.objects.enqueue(Task.Kind.PURGE, {})
    assert Task.objects.claim("w1", 30, kinds=[Task.Kind.PURGE]).pk == purge.pk
    assert Task.objects.claim("w1", 30, kinds=[Task.Kind.PURGE]) is None


@pytest.mark.django_db(transaction=True)
def test_a_task_locked_by_another_connection_is_skipped(settings):
    older = Task.objects.enqueue(Task.Kind.EXPORT, {})
    newer = Task.objects.enqueue(Task.Kind.EXPORT, {})
    params = connection.get_connection_params()
    # A second, independent connection holds the row lock of the oldest task, as a claim in progress does.
    with psycopg.connect(**params) as other:
        other.execute("SELECT id FROM jobs_task WHERE id = %s FOR UPDATE", [older.pk])
        claimed = Task.objects.claim("w1", 30)
        assert claimed.pk == newer.pk
        other.rollback()
    assert Task.objects.claim("w2", 30).pk == older.pk


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_share_a_task():
    created = [Task.objects.enqueue(Task.Kind.EXPORT, {"n": n}) for n in range(20)]
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        try:
            while (task := Task.objects.claim(name, 30)) is not None:
                with lock:
                    claimed.append(task.pk)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(task.pk for task in created)


@pytest.mark.django_db
def test_expired_lease_is_reclaimed_and_the_old_claim_cannot_report_or_finish():
    Task.objects.enqueue(Task.Kind.EXPORT, {})
    with time_machine.travel(NOW, tick=False):
        stale = Task.objects.claim("dead-worker", lease_seconds=10)
        assert Task.objects.claim("w2", lease_seconds=10) is None
    with time_machine.travel(NOW + timedelta(seconds=11), tick=False):
        fresh = Task.objects.claim("w2", lease_seconds=10)
    assert fresh.pk == stale.pk
    assert (fresh.lease_owner, fresh.attempts) == ("w2", 2)
    with pytest.raises(TaskLost):
        stale.report(0.3, force=True)
    assert not stale.succeed({"rows": 1})
    assert fresh.succeed({"rows": 2})
    fresh.refresh_from_db()
    assert (fresh.status, fresh.result, fresh.progress, fresh.lease_owner) == (
        Task.Status.SUCCEEDED,
        {"rows": 2},
        1.0,
        "",
    )


@pytest.mark.django_db
def test_a_task_whose_worker_keeps_dying_is_failed_after_max_attempts():
    task = Task.objects.enqueue(Task.Kind.EXPORT, {})
    moment = NOW
    for _ in range(Task.MAX_ATTEMPTS):
        with time_machine.travel(moment, tick=False):
            assert Task.objects.claim("w", lease_seconds=10).pk == task.pk
        moment += timedelta(seconds=11)
    with time_machine.travel(moment, tick=False):
        assert Task.objects.claim("w", lease_seconds=10) is None
    task.refresh_from_db()
    assert task.status == Task.Status.FAILED
    assert "lease expired on 3 attempts" in task.error


@pytest.mark.django_db
def test_report_renews_the_lease_and_is_throttled(django_assert_num_queries):
    Task.objects.enqueue(Task.Kind.EXPORT, {})
    with time_machine.travel(NOW, tick=False) as traveller:
        task = Task.objects.claim("w1", lease_seconds=10)
        traveller.shift(5)
        with django_assert_num_queries(1):
            task.report(0.25, "a quarter")
        with django_assert_num_queries(0):
            task.report(0.3)  # within REPORT_EVERY_SECONDS of the last write
        traveller.shift(1)
        with django_assert_num_queries(1):
            task.report(0.5, "half")
    task.refresh_from_db()
    assert (task.progress, task.message) == (0.5, "half")
    assert task.lease_expires_at == NOW + timedelta(seconds=16)


@pytest.mark.django_db
def test_run_task_records_the_handlers_result(handlers):
    Task.objects.enqueue(Task.Kind.EXPORT, {"rows": 7})
    task = Task.objects.claim("w1", 30)
    assert run_task(task) == Task.Status.SUCCEEDED
    task.refresh_from_db()
    assert (task.status, task.result, task.progress, task.error) == (Task.Status.SUCCEEDED, {"rows": 7}, 1.0, "")
    assert task.finished_at is not None


@pytest.mark.django_db
def test_a_crashing_handler_fails_the_task_with_its_message(handlers, caplog):
    Task.objects.enqueue(Task.Kind.PURGE, {})
    task = Task.objects.claim("w1", 30)
    assert run_task(task) == Task.Status.FAILED
    task.refresh_from_db()
    assert (task.status, task.error, task.lease_owner) == (Task.Status.FAILED, "ValueError: no such series", "")
    assert "Traceback" in caplog.text


@pytest.mark.django_db
def test_a_handler_that_does_not_import_fails_the_task_clearly(monkeypatch):
    monkeypatch.setitem(tasks.HANDLERS, Task.Kind.PURGE, "apps.marketdata.not_written_yet.run_purge_task")
    Task.objects.enqueue(Task.Kind.PURGE, {})
    task = Task.objects.claim("w1", 30)
    assert run_task(task) == Task.Status.FAILED
    assert "apps.marketdata.not_written_yet.run_purge_task" in task.error
    assert "cannot be imported" in task.error


@pytest.mark.django_db
def test_a_task_cancelled_while_running_stays_cancelled(handlers):
    Task.objects.enqueue(Task.Kind.INDICATORS, {})
    task = Task.objects.claim("w1", 30)
    assert run_task(task) == Task.Status.CANCELLED
    task.refresh_from_db()
    assert (task.status, task.result) == (Task.Status.CANCELLED, {})


@pytest.mark.django_db
def test_a_finished_task_cannot_be_cancelled():
    task = Task.objects.enqueue(Task.Kind.EXPORT, {})
    assert task.cancel()
    assert not task.cancel()


@pytest.mark.django_db
def test_an_idle_scheduler_worker_runs_a_pending_task(handlers):
    Task.objects.enqueue(Task.Kind.EXPORT, {"rows": 3})
    scheduler = Scheduler(
        "test:1",
        standins.instant,
        batch_size=10,
        lease_seconds=60,
        schedule_delay_seconds=2.0,
        backoff_base_seconds=5.0,
        backoff_max_seconds=900.0,
    )
    assert scheduler.process_one()
    assert not scheduler.process_one()
    task = Task.objects.get()
    assert (task.status, task.result) == (Task.Status.SUCCEEDED, {"rows": 3})
    assert task.lease_owner == ""
    assert task.attempts == 1
