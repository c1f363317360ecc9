"""Fast stand-in collectors for scheduler tests and benchmarks (`run_scheduler --collector ...`).

They do no network or candle I/O, so a test measures the scheduler alone. Stand-ins that coordinate
with a test read `DC_STANDIN_DIR`: they create marker files there and wait for the test's files.
"""

import os
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import connection

from apps.connectors.exchanges import PermanentExchangeError, TransientExchangeError
from apps.jobs.collect import CollectResult
from apps.jobs.models import Job, Run

# A blocking stand-in gives up after this long, so a broken test can never hang a process forever.
BLOCK_LIMIT_SECONDS = 30.0


def _marker_dir() -> Path:
    return Path(os.environ["DC_STANDIN_DIR"])


def instant(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    heartbeat()
    return CollectResult(candles_fetched=1, candles_written=1, requests=1)


def brief(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    """Takes a few milliseconds, so overlapping runs of one job would show in their intervals."""
    time.sleep(0.005)
    heartbeat()
    return CollectResult(candles_fetched=2, candles_written=2, requests=1)


def gated(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    """Announce this process (`ready-<pid>`), wait for the file `go` (bounded), then work briefly.

    Lets a test start several processes and hold the work until every one of them has claimed some.
    """
    directory = _marker_dir()
    (directory / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + BLOCK_LIMIT_SECONDS
    while not (directory / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return brief(job, run, heartbeat)


def blocking(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    """Announce the start (`started-<job id>`), then wait for the file `release` (bounded)."""
    directory = _marker_dir()
    (directory / f"started-{job.pk}").write_text(str(os.getpid()))
    deadline = time.monotonic() + BLOCK_LIMIT_SECONDS
    while not (directory / "release").exists() and time.monotonic() < deadline:
        heartbeat()
        time.sleep(0.02)
    return CollectResult(candles_fetched=1, candles_written=1, requests=1)


def blocking_without_heartbeat(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    """Like `blocking` but never renews its lease, as a hung worker would."""
    directory = _marker_dir()
    (directory / f"started-{job.pk}").write_text(str(os.getpid()))
    deadline = time.monotonic() + BLOCK_LIMIT_SECONDS
    while not (directory / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return CollectResult()


def transient_failure(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    raise TransientExchangeError("simulated outage: exchange unavailable")


def transient_failure_with_retry_after(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    raise TransientExchangeError("simulated 429: too many requests", retry_after=3600.0)


def permanent_failure(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    raise PermanentExchangeError(f"{job.connector.exchange_id} does not list {job.symbol}")


def crashing(job: Job, run: Run, heartbeat: Callable[[], None]) -> CollectResult:
    raise RuntimeError("bug in the collector")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child process that must use the database this test uses."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        url = f"sqlite:///{db['NAME']}"
    else:
        url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    return {
        **os.environ,
        "DATABASE_URL": url,
        "SECRET_KEY": "x",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(settings.BASE_DIR),
        **extra,
    }
