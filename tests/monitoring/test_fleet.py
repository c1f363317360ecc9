"""The fleet registry with real `run_scheduler` processes: registered at start, heartbeats, SIGTERM
deregisters, SIGKILL leaves a process that is shown as lost once its heartbeat is older than the timeout."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from apps.monitoring.models import SchedulerProcess
from datacollector.config import get_config
from tests.jobs.conftest import track
from tests.jobs.standins import child_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

HEARTBEAT = 0.2
LOST_AFTER = 1.5


@pytest.fixture
def fleet_config(settings, tmp_path) -> Path:
    """collector.yaml with a fast heartbeat and a short timeout, for the schedulers and for this process."""
    text = (settings.BASE_DIR / "config" / "collector.yaml").read_text()
    text = text.replace("  heartbeat_seconds: 10 ", f"  heartbeat_seconds: {HEARTBEAT} ")
    text = text.replace("  lost_after_seconds: 60 ", f"  lost_after_seconds: {LOST_AFTER} ")
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    settings.COLLECTOR_CONFIG = path
    get_config.cache_clear()
    assert get_config().scheduler.heartbeat_seconds == HEARTBEAT
    yield path
    get_config.cache_clear()


def start(tmp_path: Path, config: Path, name: str) -> subprocess.Popen:
    log = (tmp_path / f"{name}.log").open("w")
    return track(
        subprocess.Popen(
            [sys.executable, "manage.py", "run_scheduler", "--worker-id", name, "--workers", "3", "--interval", "0.05"],
            cwd=settings.BASE_DIR,
            env=child_env(COLLECTOR_CONFIG=str(config)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return found


def registered(name: str) -> SchedulerProcess | None:
    return SchedulerProcess.objects.filter(worker_id=name).first()


def test_a_scheduler_registers_heartbeats_and_deregisters_on_sigterm(tmp_path, fleet_config, api_client):
    process = start(tmp_path, fleet_config, "fleet-a")
    row = wait_for(lambda: registered("fleet-a"), "registration")
    assert (row.pid, row.workers, row.stopped_at) == (process.pid, 3, None)
    assert row.version == "0.1.0"
    assert row.state == SchedulerProcess.State.ALIVE
    first = row.last_heartbeat
    wait_for(lambda: registered("fleet-a").last_heartbeat > first, "a heartbeat")
    assert api_client.get("/api/v1/system/status").json()["schedulers"]["alive"] == 1

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0

    row = registered("fleet-a")
    assert row.stopped_at is not None
    assert row.state == SchedulerProcess.State.STOPPED
    assert SchedulerProcess.objects.running().count() == 0


def test_a_killed_scheduler_is_shown_as_lost_after_the_timeout(tmp_path, fleet_config, api_client):
    survivor = start(tmp_path, fleet_config, "fleet-survivor")
    victim = start(tmp_path, fleet_config, "fleet-victim")
    wait_for(lambda: registered("fleet-victim") and registered("fleet-survivor"), "both registered")

    victim.kill()
    victim.wait()
    assert registered("fleet-victim").state == SchedulerProcess.State.ALIVE  # not yet: within the timeout
    wait_for(lambda: registered("fleet-victim").state == SchedulerProcess.State.LOST, "the victim to be lost")
    assert registered("fleet-survivor").state == SchedulerProcess.State.ALIVE

    body = api_client.get("/api/v1/system/status").json()
    assert body["schedulers"] == {"alive": 1, "lost": 1, "workers": 3}

    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(timeout=30) == 0
    assert registered("fleet-victim").state == SchedulerProcess.State.LOST
