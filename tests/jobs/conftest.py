import subprocess
from collections.abc import Iterator

import pytest

# The private PostgreSQL cluster that outage tests stop and start (tests/pgcluster.py).
from tests.pgcluster import pg_cluster  # noqa: F401

# Processes (schedulers, backfills) the running test started; see `track`.
_started: list[subprocess.Popen] = []


def track(process: subprocess.Popen) -> subprocess.Popen:
    """Have `process` killed after the test that started it, if it still runs then."""
    _started.append(process)
    return process


@pytest.fixture(autouse=True)
def _kill_leftover_processes() -> Iterator[None]:
    """A failing test must not leave schedulers or backfills running (they would hold the test database)."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            process.kill()
            process.wait()
