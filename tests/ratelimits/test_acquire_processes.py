"""Four real processes hammer one shared bucket: never more than capacity + refill x time, and nearly that."""

import subprocess
import sys
import time

import pytest
from django.conf import settings

from apps.ratelimits.models import RateLimit
from tests.jobs.standins import child_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CAPACITY = 50.0
REFILL_PER_SECOND = 100.0
SECONDS = 3.0
PROCESSES = 4

# Each child connects, says it is ready, waits for the go file (start and end wall times), then calls
# acquire() as fast as the bucket lets it until the end, and prints how many grants it got and the wall
# time just after its last grant (the grant itself happened before that, on the same machine's clock).
HAMMER = """
import os, sys, time
from pathlib import Path
import django
django.setup()
from apps.ratelimits.models import RateLimit, RateLimitTimeout

directory = Path(sys.argv[1])
RateLimit.objects.filter(exchange_id="hammer").exists()  # connect before the start
(directory / f"ready-{os.getpid()}").touch()
go = directory / "go"
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
start_at, end_at = map(float, go.read_text().split())
time.sleep(max(0.0, start_at - time.time()))
granted, last_grant = 0, start_at
while (remaining := end_at - time.time()) > 0:
    try:
        RateLimit.objects.acquire("hammer", 1, timeout=remaining)
    except RateLimitTimeout:
        break
    granted, last_grant = granted + 1, time.time()
print(granted, last_grant)
"""


def hammer(tmp_path) -> tuple[float, list[tuple[int, float]]]:
    """Run PROCESSES children against the row "hammer" for SECONDS: (start_at, [(grants, last grant at)])."""
    env = child_env(DJANGO_SETTINGS_MODULE="datacollector.settings")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, str(tmp_path)],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < PROCESSES:
            assert time.monotonic() < deadline, "the children did not start"
            assert all(child.poll() is None for child in children), "a child died before the start"
            time.sleep(0.02)
        # Full bucket before the start: nothing can be granted before start_at, and at start_at the
        # bucket holds at most CAPACITY.
        start_at = time.time() + 0.2
        end_at = start_at + SECONDS
        # Written aside and renamed: a child polling for "go" must never read it half-written.
        (tmp_path / "go.tmp").write_text(f"{start_at} {end_at}")
        (tmp_path / "go.tmp").rename(tmp_path / "go")
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert [child.returncode for child in children] == [0] * PROCESSES
    reports = [output.strip().splitlines()[-1].split() for output in outputs]
    return start_at, [(int(granted), float(at)) for granted, at in reports]


def test_processes_share_the_budget_without_exceeding_it(tmp_path):
    RateLimit.objects.create(
        exchange_id="hammer", capacity=CAPACITY, refill_per_second=REFILL_PER_SECOND, tokens=CAPACITY
    )
    start_at, reports = hammer(tmp_path)

    per_process = [granted for granted, _ in reports]
    last_grant = max(at for _, at in reports)
    row = RateLimit.objects.get(exchange_id="hammer")
    assert sum(per_process) == row.granted
    assert row.tokens_used == row.granted
    # Never over: every grant happened between start_at, when the bucket held at most CAPACITY, and
    # last_grant. Both are wall times of this machine, whose clock the database server (127.0.0.1) shares.
    ceiling = CAPACITY + REFILL_PER_SECOND * (last_grant - start_at)
    assert row.granted <= ceiling, f"granted {row.granted}, ceiling {ceiling:.1f}"
    # And the budget was used: at least 95% of what the window [start_at, end_at] allowed.
    assert row.granted >= 0.95 * (CAPACITY + REFILL_PER_SECOND * SECONDS), f"granted only {row.granted}"
    print(f"granted {row.granted} of ceiling {ceiling:.1f}, per process {per_process}")
    # Every process got a share: waiting callers are not starved by a faster one.
    assert all(count > 0 for count in per_process)
    assert row.denied > 0
    assert row.wait_seconds > 0


WINDOW_SECONDS = 1.0
PER_WINDOW = 60.0  # CAPACITY (50) plus one window of 10 per second


def test_processes_sharing_a_fixed_window_never_exceed_it(tmp_path):
    # Windows start at whole seconds of the database clock, which this machine's clock is (127.0.0.1).
    RateLimit.objects.create(
        exchange_id="hammer",
        capacity=CAPACITY,
        refill_per_second=(PER_WINDOW - CAPACITY) / WINDOW_SECONDS,
        tokens=CAPACITY,
        window_seconds=WINDOW_SECONDS,
    )
    start_at, reports = hammer(tmp_path)

    per_process = [granted for granted, _ in reports]
    last_grant = max(at for _, at in reports)
    row = RateLimit.objects.get(exchange_id="hammer")
    assert sum(per_process) == row.granted
    # Every grant fell in a window from the one holding start_at to the one holding last_grant, and no
    # window grants more than PER_WINDOW.
    windows = int(last_grant // WINDOW_SECONDS) - int(start_at // WINDOW_SECONDS) + 1
    assert row.granted <= PER_WINDOW * windows, f"granted {row.granted} in {windows} windows"
    assert row.window_used <= PER_WINDOW
    # And each whole window inside [start_at, start_at + SECONDS] was spent, all of it.
    whole = int((start_at + SECONDS) // WINDOW_SECONDS) - int(start_at // WINDOW_SECONDS) - 1
    assert row.granted >= PER_WINDOW * whole, f"granted only {row.granted} in {whole} whole windows"
    print(f"granted {row.granted} in {windows} windows of {PER_WINDOW:g}, per process {per_process}")
    assert row.denied > 0
