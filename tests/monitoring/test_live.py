"""What an operator's job changes (API and admin) publish to the live hub's `jobs` channel: read from the
embedded outbox (`LiveEvent` rows), where the publisher writes when no Redis is configured."""

import pytest
from django.urls import reverse

from apps.connectors.models import Connector
from apps.jobs.models import Job
from apps.monitoring.models import LiveEvent


@pytest.fixture
def outbox(settings) -> None:
    settings.LIVE_OUTBOX = True


@pytest.fixture
def job(db) -> Job:
    connector = Connector.objects.create(exchange_id="binance")
    return Job.objects.create(connector=connector, symbol="BTC/USDT", timeframe="1m")


def published() -> list[tuple[str, str, int, str]]:
    return [
        (group, event.payload["event"], event.payload["job"]["id"], event.payload["job"]["status"])
        for event in LiveEvent.objects.order_by("pk")
        for group in event.groups
    ]


@pytest.mark.parametrize(("action", "status"), [("pause", "paused"), ("resume", "active"), ("run-now", "active")])
def test_api_actions_publish_the_jobs_new_status_once_committed(
    api_client, job, outbox, action, status, django_capture_on_commit_callbacks
) -> None:
    if action != "pause":
        job.pause()
    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(f"/api/v1/jobs/{job.pk}/{action}/")
        assert LiveEvent.objects.count() == 0  # nothing before the commit

    assert response.status_code == 200
    assert published() == [
        ("jobs", "status", job.pk, status),
        (f"jobs.connector.{job.connector_id}", "status", job.pk, status),
    ]


def test_admin_actions_publish_every_selected_jobs_new_status(
    admin_client, job, outbox, django_capture_on_commit_callbacks
) -> None:
    other = Job.objects.create(connector=job.connector, symbol="ETH/USDT", timeframe="1m")

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:jobs_job_changelist"), {"action": "pause_jobs", "_selected_action": [job.pk, other.pk]}
        )

    assert response.status_code == 302
    assert sorted(event for event in published() if event[0] == "jobs") == [
        ("jobs", "status", job.pk, "paused"),
        ("jobs", "status", other.pk, "paused"),
    ]


def test_an_action_that_matches_no_job_publishes_nothing(job, outbox, django_capture_on_commit_callbacks) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        assert Job.objects.filter(symbol="NONE/USDT").pause() == 0

    assert published() == []
