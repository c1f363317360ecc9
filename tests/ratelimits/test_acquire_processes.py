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


def test_processes_share_the_budget_without_exceeding_it(tmp_path):
    RateLimit.objects.create(
        exchange_id="hammer", capacity=CAPACITY, refill_per_second=REFILL_PER_SECOND, tokens=CAPACITY
    )
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
        (tmp_path / "go").write_text(f"{start_at} {end_at}")
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert [child.returncode for child in children] == [0] * PROCESSES

    reports = [output.strip().splitlines()[-1].split() for output in outputs]
    per_process = [int(granted) for granted, _ in reports]
    last_grant = max(float(at) for _, at in reports)
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
