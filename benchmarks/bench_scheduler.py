"""Claim + release throughput of the scheduler with 1, 2 and 4 processes at 10,000 and 100,000 jobs.

Each process runs the real worker step (`Scheduler.process_one`: claim a batch with SKIP LOCKED,
begin, collect, release, log) with a collector that does nothing, so the figures are the scheduler's
own overhead per job. Jobs are all due; every process works for a fixed time (or until nothing is due).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dc_sched_bench SECRET_KEY=x .venv/bin/python -m benchmarks scheduler

A scratch database beside DATABASE_URL's (<name>_bench_scheduler) is created, migrated and dropped.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scratch import scratch_database

JOB_COUNTS = (10_000, 100_000)
PROCESS_COUNTS = (1, 2, 4)
SECONDS = 5.0
REPEATS = 2
BATCH_SIZE = 10
ROOT = Path(__file__).resolve().parent.parent


def run_children(
    module: str, count: int, args: list[str], wait_seconds: float = 120, **env_overrides: str
) -> list[str]:
    """Start `count` processes of `python -m module --child ARGS`; release them together; their stdout."""
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_DIR": directory, **env_overrides}
        children = [
            subprocess.Popen(
                [sys.executable, "-m", module, "--child", *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for _ in range(count)
        ]
        try:
            deadline = time.monotonic() + wait_seconds
            while len(list(Path(directory).glob("ready-*"))) < count:
                if time.monotonic() > deadline or any(child.poll() is not None for child in children):
                    raise RuntimeError("benchmark children did not start")
                time.sleep(0.02)
            (Path(directory) / "go").write_text(str(time.time() + 0.2))
            return [child.communicate(timeout=wait_seconds)[0] for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()


def wait_for_go() -> float:
    """In a child: announce readiness, then wait for the common start time."""
    directory = Path(os.environ["BENCH_DIR"])
    (directory / f"ready-{os.getpid()}").touch()
    go = directory / "go"
    while not go.exists():
        time.sleep(0.005)
    start_at = float(go.read_text())
    time.sleep(max(0.0, start_at - time.time()))
    return start_at


def _noop_collector(job, run, heartbeat):
    from apps.jobs.collect import CollectResult

    heartbeat()
    return CollectResult()


def child(seconds: float, batch_size: int) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")
    django.setup()
    from apps.jobs.management.commands.run_scheduler import Scheduler
    from apps.jobs.models import Job
    from datacollector.config import get_config

    config = get_config().scheduler
    scheduler = Scheduler(
        f"bench:{os.getpid()}",
        _noop_collector,
        batch_size=batch_size,
        lease_seconds=config.lease_seconds,
        schedule_delay_seconds=config.schedule_delay_seconds,
        backoff_base_seconds=config.backoff_base_seconds,
        backoff_max_seconds=config.backoff_max_seconds,
    )
    Job.objects.exists()  # connect before the start
    wait_for_go()
    started = time.perf_counter()
    processed = 0
    while time.perf_counter() - started < seconds and scheduler.process_one():
        processed += 1
    print(processed, time.perf_counter() - started)


def seed(count: int) -> None:
    from django.db import connection
    from django.utils import timezone

    from apps.connectors.models import Connector
    from apps.jobs.models import Job, Run

    Run.objects.all().delete()
    Job.objects.all().delete()
    connector, _ = Connector.objects.get_or_create(exchange_id="simulated")
    now = timezone.now()
    timeframes = ("1m", "5m", "1h", "1d")
    Job.objects.bulk_create(
        (
            Job(connector=connector, symbol=f"B{i}/USDT", timeframe=timeframes[i % 4], next_run_at=now)
            for i in range(count)
        ),
        batch_size=5000,
    )
    with connection.cursor() as cursor:
        # Spread the due times so ORDER BY next_run_at has work to do, as in a real backlog.
        cursor.execute("UPDATE jobs_job SET next_run_at = now() - random() * interval '1 hour'")
    _vacuum()


def reset_due() -> None:
    from django.db import connection

    from apps.jobs.models import Run

    Run.objects.all().delete()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE jobs_job SET next_run_at = now() - random() * interval '1 hour', lease_owner = '', "
            "lease_expires_at = NULL WHERE next_run_at > now() - interval '1 hour' OR lease_owner <> ''"
        )
    _vacuum()


def _vacuum() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE jobs_job")
        cursor.execute("VACUUM ANALYZE jobs_run")


def explain_claim() -> str:
    from django.db import connection, transaction

    from apps.jobs.models import Job

    with transaction.atomic():
        query = Job.objects.due().select_for_update(skip_locked=True, of=("self",)).select_related("connector")
        sql, params = query.order_by("next_run_at")[:BATCH_SIZE].query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, params)
            plan = [row[0] for row in cursor.fetchall()]
        transaction.set_rollback(True)
    return "\n".join("    " + line for line in plan)


def main() -> None:
    with scratch_database("scheduler"):
        print(f"claim+release with a no-op collector, batch {BATCH_SIZE}, {SECONDS:.0f}s per configuration")
        print(f"each configuration runs {REPEATS} times (the machine is shared: compare the best)")
        print(f"{'jobs':>8} {'procs':>5} {'jobs/s':>16} {'ms/job/proc (best)':>19}")
        for count in JOB_COUNTS:
            seed(count)
            print(f"  claim query plan at {count:,} due jobs:\n{explain_claim()}")
            for processes in PROCESS_COUNTS:
                rates, per_job = [], []
                for _ in range(REPEATS):
                    reset_due()
                    # LOG_LEVEL=INFO: the JSON line per run is part of the cost (formatted, sent to /dev/null).
                    outputs = run_children(
                        "benchmarks.bench_scheduler", processes, [str(SECONDS), str(BATCH_SIZE)], LOG_LEVEL="INFO"
                    )
                    results = [line.split() for line in (o.strip().splitlines()[-1] for o in outputs)]
                    rates.append(sum(int(n) for n, _ in results) / max(float(t) for _, t in results))
                    per_job.append(statistics.mean(float(t) / max(1, int(n)) for n, t in results) * 1000)
                shown = " / ".join(f"{rate:.0f}" for rate in rates)
                print(f"{count:>8,} {processes:>5} {shown:>16} {min(per_job):>19.2f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(float(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
