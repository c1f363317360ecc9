"""`manage.py run_scheduler` as a real process runs background tasks (`Task`) once no job is due."""

import pytest

from apps.jobs.models import Run, Task
from tests.jobs.test_run_scheduler import finish, make_jobs, start_scheduler

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_a_scheduler_process_claims_runs_and_records_a_pending_task_after_the_due_jobs(tmp_path):
    (job,) = make_jobs(1)
    # A kind without a handler: the process must record the failure on the row and carry on to exit
    # cleanly (tests/marketdata/test_exports.py runs a real export through a process too).
    broken = Task.objects.create(kind="no-such-kind", params={})
    process = start_scheduler(
        tmp_path, "tasker", "--once", "--workers", "1", "--collector", "tests.jobs.standins.instant"
    )
    assert finish(process, tmp_path, "tasker") == 0

    broken.refresh_from_db()
    assert broken.status == Task.Status.FAILED
    assert "no handler for tasks of kind 'no-such-kind'" in broken.error
    assert broken.attempts == 1
    assert broken.lease_owner == ""
    assert broken.finished_at is not None
    run = Run.objects.get(job=job)
    assert run.status == Run.Status.SUCCESS
    # The due job went first: a task never delays collection.
    assert run.finished_at <= broken.started_at
