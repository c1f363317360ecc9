"""`manage.py run_scheduler` as real processes sharing the test database."""

import itertools
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone

from apps.connectors.models import Connector
from apps.jobs.models import Job, Run
from tests.jobs.conftest import track
from tests.jobs.standins import child_env

PROCESS_TIMEOUT = 60

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def start_scheduler(tmp_path: Path, name: str, *args: str, log_level: str = "WARNING") -> subprocess.Popen:
    log = (tmp_path / f"{name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "run_scheduler", "--worker-id", name, "--interval", "0.05", *args],
        cwd=settings.BASE_DIR,
        env=child_env(DC_STANDIN_DIR=str(tmp_path), LOG_LEVEL=log_level),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return track(process)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish(process: subprocess.Popen, tmp_path: Path, name: str) -> int:
    try:
        return process.wait(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"{name} did not exit; its log:\n{(tmp_path / f'{name}.log').read_text()}") from None


def make_jobs(count: int, timeframe: str = "1m") -> list[Job]:
    connector = Connector.objects.create(exchange_id="simulated")
    now = timezone.now()
    return Job.objects.bulk_create(
        Job(connector=connector, symbol=f"C{i}/USDT", timeframe=timeframe, next_run_at=now) for i in range(count)
    )


def test_three_processes_run_every_due_job_exactly_once(tmp_path):
    jobs = make_jobs(300)
    names = [f"proc{i}" for i in range(3)]
    processes = [
        start_scheduler(tmp_path, name, "--once", "--workers", "2", "--batch-size", "5", "--collector",
                        "tests.jobs.standins.gated")
        for name in names
    ]  # fmt: skip
    # Hold the work until every process has claimed some, so they all compete for the rest.
    wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == len(names), what="every process to claim jobs")
    (tmp_path / "go").touch()
    codes = [finish(process, tmp_path, name) for process, name in zip(processes, names, strict=True)]
    assert codes == [0, 0, 0]

    runs = list(Run.objects.values("job_id", "status", "worker", "started_at", "finished_at"))
    by_job = defaultdict(list)
    for run in runs:
        by_job[run["job_id"]].append(run)
    assert set(by_job) == {job.pk for job in jobs}
    assert all(len(job_runs) == 1 for job_runs in by_job.values())
    assert all(run["status"] == Run.Status.SUCCESS and run["finished_at"] is not None for run in runs)
    for job_runs in by_job.values():
        intervals = sorted((run["started_at"], run["finished_at"]) for run in job_runs)
        assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(intervals))
    # The work was shared: every process ran some of it.
    assert {run["worker"].split("/")[0] for run in runs} == set(names)
    assert not Job.objects.exclude(lease_owner="").exists()
    assert not Job.objects.filter(next_run_at__lte=timezone.now()).exists()


def test_job_of_a_killed_process_is_reclaimed_and_its_run_closed_as_failed(tmp_path):
    (job,) = make_jobs(1)
    victim = start_scheduler(
        tmp_path, "victim", "--workers", "1", "--lease-seconds", "1", "--collector", "tests.jobs.standins.blocking"
    )
    wait_for(lambda: (tmp_path / f"started-{job.pk}").exists(), what="the job to start")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=PROCESS_TIMEOUT)
    killed_run = Run.objects.get(job=job)
    assert killed_run.status == Run.Status.RUNNING

    # The lease outlives its holder by at most --lease-seconds; then the job is due for anyone.
    wait_for(lambda: Job.objects.due().filter(pk=job.pk).exists(), what="the lease to expire")
    survivor = start_scheduler(tmp_path, "survivor", "--once", "--collector", "tests.jobs.standins.instant")
    assert finish(survivor, tmp_path, "survivor") == 0

    killed_run.refresh_from_db()
    assert (killed_run.status, killed_run.error) == (Run.Status.FAILED, "lease expired")
    completed = Run.objects.exclude(pk=killed_run.pk).get(job=job)
    assert completed.status == Run.Status.SUCCESS
    assert completed.worker.startswith("survivor/")
    assert killed_run.finished_at <= completed.started_at
    job.refresh_from_db()
    assert job.lease_owner == ""
    assert job.next_run_at > timezone.now()


def test_sigterm_finishes_the_running_job_and_releases_the_unstarted_ones(tmp_path):
    jobs = make_jobs(4)
    process = start_scheduler(
        tmp_path, "graceful", "--workers", "1", "--batch-size", "4", "--collector", "tests.jobs.standins.blocking"
    )
    wait_for(lambda: list(tmp_path.glob("started-*")), what="a job to start")
    (started,) = tmp_path.glob("started-*")
    running_job_id = int(started.name.removeprefix("started-"))
    process.send_signal(signal.SIGTERM)
    (tmp_path / "release").touch()
    assert finish(process, tmp_path, "graceful") == 0

    run = Run.objects.get()
    assert run.job_id == running_job_id
    assert run.status == Run.Status.SUCCESS
    others = Job.objects.exclude(pk=running_job_id)
    assert others.count() == len(jobs) - 1
    assert not others.exclude(lease_owner="").exists()
    assert others.due().count() == len(jobs) - 1


def test_second_signal_exits_at_once(tmp_path):
    (job,) = make_jobs(1)
    process = start_scheduler(
        tmp_path, "impatient", "--workers", "1", "--collector", "tests.jobs.standins.blocking", log_level="INFO"
    )
    wait_for(lambda: (tmp_path / f"started-{job.pk}").exists(), what="the job to start")
    process.send_signal(signal.SIGTERM)
    # Two signals sent before the first is handled would count as one.
    log = tmp_path / "impatient.log"
    wait_for(lambda: "finishing running jobs" in log.read_text(), what="the first signal to be handled")
    process.send_signal(signal.SIGTERM)
    assert finish(process, tmp_path, "impatient") == 128 + signal.SIGTERM
    # Abandoned mid-run: the lease expires and another worker takes the job over.
    assert Run.objects.get().status == Run.Status.RUNNING


def test_claims_on_sqlite_never_give_one_job_to_two_processes(tmp_path):
    database = tmp_path / "db.sqlite3"
    env = child_env(DATABASE_URL=f"sqlite:///{database}")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=settings.BASE_DIR, env=env, check=True
    )
    seed = (
        "from django.utils import timezone;"
        "from apps.connectors.models import Connector; from apps.jobs.models import Job;"
        "c = Connector.objects.create(exchange_id='simulated');"
        "Job.objects.bulk_create(Job(connector=c, symbol=f'C{i}/USDT', timeframe='1m', next_run_at=timezone.now())"
        " for i in range(60))"
    )
    subprocess.run([sys.executable, "manage.py", "shell", "-c", seed], cwd=settings.BASE_DIR, env=env, check=True)
    processes = [
        subprocess.Popen(
            [sys.executable, "manage.py", "run_scheduler", "--once", "--workers", "2", "--batch-size", "3",
             "--worker-id", f"lite{i}", "--collector", "tests.jobs.standins.brief"],
            cwd=settings.BASE_DIR, env=env,
        )
        for i in range(2)
    ]  # fmt: skip
    assert [process.wait(timeout=PROCESS_TIMEOUT) for process in processes] == [0, 0]
    check = (
        "from apps.jobs.models import Run; from django.db.models import Count;"
        "runs = Run.objects.values('job_id').annotate(n=Count('id'));"
        "print(len(runs), max(r['n'] for r in runs), Run.objects.exclude(status='success').count())"
    )
    output = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", check],
        cwd=settings.BASE_DIR, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert output.splitlines()[-1].split() == ["60", "1", "0"]


def test_invalid_options_are_refused_with_a_clear_message():
    with pytest.raises(CommandError, match="--workers must be at least 1"):
        call_command("run_scheduler", "--workers", "0")
    with pytest.raises(CommandError, match=r"--collector 'no\.such\.module' cannot be imported"):
        call_command("run_scheduler", "--collector", "no.such.module")


def test_metrics_and_one_json_log_line_per_run(tmp_path):
    (job,) = make_jobs(1)
    # One worker: its first claim is number 0 (several workers' claims go out at once, in any order).
    process = start_scheduler(
        tmp_path,
        "observed",
        "--workers",
        "1",
        "--metrics-port",
        "0",
        "--collector",
        "tests.jobs.standins.instant",
        log_level="INFO",
    )
    try:
        log = tmp_path / "observed.log"
        wait_for(lambda: '"outcome": "success"' in log.read_text(), what="the run's log line")
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        (port,) = [line["port"] for line in lines if "port" in line]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
    assert finish(process, tmp_path, "observed") == 0
    assert 'dc_scheduler_runs_total{outcome="success"} 1.0' in metrics
    assert "dc_scheduler_candles_written_total 1.0" in metrics
    (run_line,) = [line for line in lines if line.get("outcome")]
    assert run_line["job_id"] == job.pk
    assert run_line["exchange"] == "simulated"
    assert run_line["symbol"] == "C0/USDT"
    assert run_line["timeframe"] == "1m"
    assert run_line["worker"] == "observed/0"
    assert run_line["outcome"] == "success"
    assert run_line["candles_written"] == 1
    assert run_line["duration_seconds"] >= 0
