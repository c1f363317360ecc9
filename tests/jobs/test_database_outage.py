"""A real PostgreSQL outage under real `run_scheduler` and `backfill` processes: nothing lost, nothing stalled.

Each test gets a database in a private cluster (tests/pgcluster.py), never the shared server, runs the
commands against it with the real collector and the offline simulated exchange (deterministic candles,
a set latency per request so work is in flight), stops PostgreSQL while jobs are claimed and running,
and starts it again. Leases are 1,800 s long: a test that passed only through lease expiry would time out.
The test reads the private database with plain psycopg (its own Django connection is the shared server's).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings

from tests.jobs.conftest import track
from tests.pgcluster import PostgresCluster

pytestmark = pytest.mark.slow

LEASE_SECONDS = "1800"
PROCESS_TIMEOUT = 300
# Generous, for a loaded machine: reached within seconds of work when the code is right; a job stuck behind
# its lease would need 1,800 s.
DEADLINE = 300.0
HOUR = 3_600_000
SYMBOLS = ["BTC/USDT", "ETH/USDT", "BNB/USDT", "XRP/USDT", "SOL/USDT", "DOGE/USDT"]
TIMEFRAMES_MS = {"1h": HOUR, "2h": 2 * HOUR, "4h": 4 * HOUR, "6h": 6 * HOUR}
# Four years of hourly candles are 36 pages of 1,000; at 100 ms a request a job runs for seconds.
SINCE = (datetime.now(UTC) - timedelta(days=1500)).replace(hour=0, minute=0, second=0, microsecond=0)
SINCE_MS = int(SINCE.timestamp() * 1000)


@pytest.fixture
def database(pg_cluster: PostgresCluster) -> str:
    pg_cluster.ensure_started()
    return pg_cluster.migrated_database()


def env_for(cluster: PostgresCluster, database: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": cluster.url(database),
        "SECRET_KEY": "x",
        "MONGODB_URI": "",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(settings.BASE_DIR),
    }


def manage(env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return track(process)


def seed(env: dict[str, str], symbols: list[str], timeframes: list[str]) -> None:
    """The simulated connector (100 ms a request) and one job per symbol and timeframe, all due now."""
    code = (
        "from datetime import datetime; from django.utils import timezone;"
        "from apps.connectors.models import Connector; from apps.jobs.models import Job;"
        "c = Connector.objects.create(exchange_id='simulated', options={'latency_ms': 100});"
        f"since = datetime.fromisoformat({SINCE.isoformat()!r});"
        "Job.objects.bulk_create(Job(connector=c, symbol=s, timeframe=t, since=since, next_run_at=timezone.now())"
        f" for s in {symbols!r} for t in {timeframes!r})"
    )
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=settings.BASE_DIR, env=env, check=True, timeout=120
    )


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def query(cluster: PostgresCluster, database: str, sql: str) -> list[tuple]:
    with cluster.connect(database) as conn:
        return conn.execute(sql).fetchall()


def leases_and_running_runs(cluster: PostgresCluster, database: str) -> tuple[int, int]:
    ((leased,),) = query(cluster, database, "SELECT count(*) FROM jobs_job WHERE lease_owner <> ''")
    ((running,),) = query(cluster, database, "SELECT count(*) FROM jobs_run WHERE status = 'running'")
    return leased, running


def every_job_collected(cluster: PostgresCluster, database: str, at_ms: int | None = None) -> bool:
    """Every job's cursor is at its last closed candle (at `at_ms`, default now), no job leased, no run running."""
    now_ms = at_ms or int(time.time() * 1000)
    jobs = query(cluster, database, "SELECT timeframe, cursor FROM jobs_job")
    collected = all(
        cursor is not None and cursor >= now_ms // TIMEFRAMES_MS[tf] * TIMEFRAMES_MS[tf] - TIMEFRAMES_MS[tf]
        for tf, cursor in jobs
    )
    return collected and leases_and_running_runs(cluster, database) == (0, 0)


def assert_every_candle_stored_once(cluster: PostgresCluster, database: str) -> None:
    jobs = query(cluster, database, "SELECT symbol, timeframe, cursor FROM jobs_job ORDER BY id")
    for symbol, timeframe, cursor in jobs:
        rows = query(
            cluster,
            database,
            "SELECT ts FROM marketdata_candle WHERE exchange_id = 'simulated' "
            f"AND symbol = '{symbol}' AND timeframe = '{timeframe}' ORDER BY ts",
        )
        step = TIMEFRAMES_MS[timeframe]
        assert [ts for (ts,) in rows] == list(range(SINCE_MS, cursor + 1, step)), f"{symbol} {timeframe}"


def cursors_saved(cluster: PostgresCluster, database: str, count: int) -> bool:
    ((saved,),) = query(cluster, database, "SELECT count(*) FROM jobs_job WHERE cursor IS NOT NULL")
    return saved >= count


def log_messages(log: Path) -> list[str]:
    messages = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            messages.append(json.loads(line).get("message", ""))
    return messages


def assert_one_line_per_outage_change(log: Path) -> None:
    messages = log_messages(log)
    assert len([m for m in messages if m.startswith("database unavailable")]) == 1, log.read_text()
    assert len([m for m in messages if m.startswith("database available again")]) == 1, log.read_text()
    assert "Traceback" not in log.read_text()


def finish(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"the process did not exit; its output:\n{log.read_text()}") from None


# "immediate" is a crash: PostgreSQL forgets the asynchronous commits of its last moments (releases).
@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
def test_scheduler_jobs_are_released_as_soon_as_the_database_is_back(pg_cluster, database, tmp_path, stop_mode):
    env = env_for(pg_cluster, database)
    seed(env, SYMBOLS, list(TIMEFRAMES_MS))  # 24 jobs
    logs = [tmp_path / f"scheduler{i}.log" for i in range(2)]
    processes = [
        manage(env, "run_scheduler", "--worker-id", f"outage{i}", "--workers", "2", "--batch-size", "4",
               "--interval", "0.05", "--lease-seconds", LEASE_SECONDS, log=log)
        for i, log in enumerate(logs)
    ]  # fmt: skip
    # Stop the database while some jobs are done, some running and some claimed but not started.
    wait_for(lambda: cursors_saved(pg_cluster, database, 4), "the first pages to be stored")
    pg_cluster.stop(stop_mode)
    wait_for(
        lambda: all("database unavailable" in log.read_text() for log in logs), "every process to notice the outage"
    )
    pg_cluster.start()

    wait_for(lambda: every_job_collected(pg_cluster, database), "every job to be collected and released")
    for process in processes:
        process.send_signal(signal.SIGTERM)
    assert [finish(process, log) for process, log in zip(processes, logs, strict=True)] == [0, 0]

    assert leases_and_running_runs(pg_cluster, database) == (0, 0)
    assert_every_candle_stored_once(pg_cluster, database)
    # The runs the outage cut short were released as failed (and their jobs collected again), not by expiry.
    assert not query(pg_cluster, database, "SELECT id FROM jobs_run WHERE error = 'lease expired'")
    for log in logs:
        assert_one_line_per_outage_change(log)


BACKFILL = ["backfill", "--exchange", "simulated", "--symbol", "BTC/USDT,ETH/USDT,SOL/USDT", "--timeframe", "1h",
            "--since", SINCE.strftime("%Y-%m-%d"), "--workers", "2", "--lease-seconds", LEASE_SECONDS,
            "-v", "0"]  # fmt: skip


def start_backfill_and_stop_the_database(pg_cluster, database, env, log, *args) -> subprocess.Popen:
    seed(env, [], [])  # the connector only: backfill creates its jobs
    process = manage(env, *BACKFILL, *args, log=log)
    wait_for(lambda: cursors_saved(pg_cluster, database, 2), "the first pages to be stored")
    pg_cluster.stop("fast")
    return process


def test_backfill_rides_out_an_outage_shorter_than_its_limit(pg_cluster, database, tmp_path):
    started_ms = int(time.time() * 1000)
    log = tmp_path / "backfill.log"
    process = start_backfill_and_stop_the_database(
        pg_cluster, database, env_for(pg_cluster, database), log, "--max-outage", "300"
    )
    wait_for(lambda: "database unavailable" in log.read_text(), "the backfill to notice the outage")
    pg_cluster.start()

    assert finish(process, log) == 0, log.read_text()
    output = log.read_text()
    assert "Backfill: " in output
    assert output.count(": done;") == 3
    assert every_job_collected(pg_cluster, database, at_ms=started_ms)
    assert_every_candle_stored_once(pg_cluster, database)
    assert_one_line_per_outage_change(log)


def test_backfill_stops_with_its_summary_after_a_longer_outage_and_a_rerun_starts_at_once(
    pg_cluster, database, tmp_path
):
    env, log = env_for(pg_cluster, database), tmp_path / "backfill.log"
    process = start_backfill_and_stop_the_database(pg_cluster, database, env, log, "--max-outage", "2")
    code = finish(process, log)
    output = log.read_text()
    assert code != 0, output
    assert "Backfill: " in output  # the summary
    assert re.search(r": failed: database unavailable for \d+ s", output)
    assert "the database was unavailable longer than 2 s (--max-outage)" in output
    assert "CommandError: 3 job(s) did not complete" in output
    assert "Traceback" not in output

    pg_cluster.start()
    # Its leases could not be released without the database; they block nothing for this host's next run.
    leased, running = leases_and_running_runs(pg_cluster, database)
    assert leased == running > 0
    started_ms = int(time.time() * 1000)
    rerun_log = tmp_path / "rerun.log"
    rerun = manage(env, *BACKFILL, log=rerun_log)
    assert finish(rerun, rerun_log) == 0, rerun_log.read_text()
    assert "skipped" not in rerun_log.read_text()
    assert rerun_log.read_text().count(": done;") == 3
    assert every_job_collected(pg_cluster, database, at_ms=started_ms)
    assert_every_candle_stored_once(pg_cluster, database)
