"""GET /api/v1/system/status, /stats and /jobs against PostgreSQL."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from apps.jobs.models import Job, Run
from apps.marketdata import store
from apps.monitoring.models import SchedulerProcess
from apps.ratelimits.models import RateLimit
from tests.conftest import grant

pytestmark = pytest.mark.django_db


def process(name: str, beat_seconds_ago: float = 0.0, stopped: bool = False) -> SchedulerProcess:
    now = timezone.now()
    return SchedulerProcess.objects.create(
        worker_id=name,
        host="host",
        pid=1,
        workers=4,
        version="0.1.0",
        last_heartbeat=now - timedelta(seconds=beat_seconds_ago),
        stopped_at=now if stopped else None,
    )


def run(job: Job, status: str, minutes_ago: float, requests: int = 1, **fields) -> Run:
    started = timezone.now() - timedelta(minutes=minutes_ago)
    finished = None if status == Run.Status.RUNNING else started + timedelta(seconds=1)
    return Run.objects.create(
        job=job, status=status, worker="w1/0", started_at=started, finished_at=finished, requests=requests, **fields
    )


def test_status_is_200_with_a_live_scheduler_and_reports_the_fleet(api_client, job):
    process("alive")
    process("lost", beat_seconds_ago=600)
    process("gone", beat_seconds_ago=600, stopped=True)
    Job.objects.filter(pk=job.pk).update(next_run_at=timezone.now() - timedelta(hours=1))
    run(job, Run.Status.RUNNING, 0.5)
    RateLimit.objects.block("binance", 30)

    response = api_client.get("/api/v1/system/status")

    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert body["version"] == "0.1.0"
    assert body["checks"] == {"database": {"status": "ok"}}
    assert body["candle_store"] == store.backend_name()
    assert body["schedulers"] == {"alive": 1, "lost": 1, "workers": 4}
    assert body["jobs_overdue"] == 1
    assert body["runs_in_flight"] == 1
    assert body["exchanges_backing_off"] == ["binance"]
    assert body["degraded"] == ["exchanges"]


def test_status_is_200_but_degraded_when_no_scheduler_is_alive(api_client):
    process("lost", beat_seconds_ago=600)
    response = api_client.get("/api/v1/system/status")
    assert response.status_code == 200
    assert (response.json()["ok"], response.json()["degraded"]) == (True, ["schedulers"])


def test_status_is_503_when_a_component_fails_as_health_ready_is(api_client, settings):
    # A MongoDB no one answers at (a closed port): the same check /health/ready makes.
    settings.MONGODB_URI = "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200&connectTimeoutMS=200"
    response = api_client.get("/api/v1/system/status")
    assert response.status_code == 503
    assert response.json()["failing"] == ["mongodb"]
    assert "error" not in response.json()["checks"]["mongodb"]  # hosts and ports: staff only


def test_stats_count_requests_429s_and_runs_by_outcome_over_the_hour_and_the_day(api_client, job):
    run(job, Run.Status.SUCCESS, 10, requests=3, candles_written=100)
    run(job, Run.Status.FAILED, 20, requests=2)
    run(job, Run.Status.SUCCESS, 180, requests=5, candles_written=50)
    run(job, Run.Status.SUCCESS, 60 * 30, requests=7)  # older than a day
    run(job, Run.Status.RUNNING, 1, requests=1)
    RateLimit.objects.block("simulated", 1)
    store.upsert_candles("simulated", "BTC/USDT", "1m", [[60_000 * i, 1, 2, 0.5, 1.5, 10] for i in range(5)])
    store.upsert_candles("simulated", "ETH/USDT", "1h", [[3_600_000, 1, 2, 0.5, 1.5, 10]])

    body = api_client.get("/api/v1/system/stats").json()

    assert (body["series"], body["candles"]) == (2, 6)
    assert body["last_hour"] == {
        "requests": 6,
        "candles_written": 100,
        "rate_limited": 1,
        "runs": {"running": 1, "success": 1, "failed": 1},
    }
    assert body["last_day"]["requests"] == 11
    assert body["last_day"]["runs"] == {"running": 1, "success": 2, "failed": 1}


def test_jobs_lists_the_runs_in_flight_with_worker_series_pages_and_age(api_client, job):
    run(job, Run.Status.SUCCESS, 5)
    running = run(job, Run.Status.RUNNING, 2, requests=7, candles_fetched=7000)

    body = api_client.get("/api/v1/system/jobs").json()

    assert body["count"] == 1
    (entry,) = body["runs"]
    assert entry["run"] == running.pk
    assert (entry["worker"], entry["exchange_id"], entry["symbol"], entry["timeframe"]) == (
        "w1/0",
        "simulated",
        "BTC/USDT",
        "1m",
    )
    assert (entry["pages"], entry["candles_fetched"]) == (7, 7000)
    assert 110 <= entry["age_seconds"] <= 200


def test_the_system_endpoints_need_their_view_permissions():
    nobody = APIClient()
    nobody.force_authenticate(get_user_model().objects.create_user("nobody"))
    for path in ("/api/v1/system/status", "/api/v1/system/stats", "/api/v1/system/jobs"):
        assert nobody.get(path).status_code == 403, path
    reader = APIClient()
    reader.force_authenticate(grant(get_user_model().objects.create_user("reader"), "view_run"))
    assert reader.get("/api/v1/system/jobs").status_code == 200
    assert reader.get("/api/v1/system/status").status_code == 403


def test_the_admin_lists_the_scheduler_processes_with_their_state(admin_client):
    process("alive-one")
    process("lost-one", beat_seconds_ago=600)
    page = admin_client.get("/admin/monitoring/schedulerprocess/").content.decode()
    assert "alive-one" in page
    assert "lost-one" in page
    assert ">lost<" in page
    assert admin_client.get("/admin/monitoring/schedulerprocess/add/").status_code == 403
