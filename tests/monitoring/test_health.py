import json
import os
import socket
import subprocess
import sys

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import override_settings

from apps.monitoring import views


def closed_port() -> int:
    # Bind to an ephemeral port and release it: nothing listens there afterwards.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_liveness_is_200_json_without_touching_the_database(client) -> None:
    # No `db` fixture: pytest-django fails the test if the view queries the database.
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert client.get("/health/").status_code == 200


@pytest.fixture
def staff_client(client, db):
    client.force_login(get_user_model().objects.create_user("ops", password="ops-password-1", is_staff=True))
    return client


def test_readiness_is_200_when_the_database_answers(client, db) -> None:
    response = client.get("/health/ready")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readiness_shows_staff_each_check(staff_client) -> None:
    response = staff_client.get("/health/ready")

    assert response.json() == {"status": "ok", "checks": {"database": {"status": "ok"}}}


def test_readiness_is_503_naming_mongodb_when_it_is_unreachable(client, db, monkeypatch) -> None:
    # A shorter server selection than production's keeps the test quick; the code path is the same.
    monkeypatch.setattr(views, "MONGODB_TIMEOUT_MS", 200)
    port = closed_port()

    with override_settings(MONGODB_URI=f"mongodb://127.0.0.1:{port}/"):
        response = client.get("/health/ready")

    assert response.status_code == 503
    # Anonymous callers learn what fails, not where it runs.
    assert response.json() == {"status": "unavailable", "failing": ["mongodb"]}
    assert str(port).encode() not in response.content


def test_readiness_tells_staff_why_mongodb_fails(staff_client, monkeypatch) -> None:
    monkeypatch.setattr(views, "MONGODB_TIMEOUT_MS", 200)
    port = closed_port()

    with override_settings(MONGODB_URI=f"mongodb://127.0.0.1:{port}/"):
        response = staff_client.get("/health/ready")

    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["mongodb"]
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["checks"]["mongodb"]["status"] == "error"
    assert f"127.0.0.1:{port}" in body["checks"]["mongodb"]["error"]


def test_readiness_hides_details_from_a_non_staff_user(client, user, monkeypatch) -> None:
    monkeypatch.setattr(views, "MONGODB_TIMEOUT_MS", 200)
    client.force_login(user)

    with override_settings(MONGODB_URI=f"mongodb://127.0.0.1:{closed_port()}/"):
        response = client.get("/health/ready")

    assert response.json() == {"status": "unavailable", "failing": ["mongodb"]}


@pytest.mark.parametrize("cookie", ["", "sessionid=some-session-key"])
def test_readiness_is_503_naming_the_database_when_it_is_unreachable(cookie) -> None:
    # A separate process whose DATABASE_URL points at a closed port: the test's own connection stays intact.
    # With a session cookie, finding out whether the caller is staff needs the database too: that must
    # not turn the 503 into a 500.
    probe = (
        "import json; from django.test import Client; "
        f"r = Client().get('/health/ready', HTTP_HOST='127.0.0.1', HTTP_COOKIE={cookie!r}); "
        "print(r.status_code, json.dumps(r.json()))"
    )
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{closed_port()}/nowhere",
        "MONGODB_URI": "",
        "SECRET_KEY": "x",
        "LOG_LEVEL": "CRITICAL",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", probe],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    status, body = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert status == "503"
    assert json.loads(body) == {"status": "unavailable", "failing": ["database"]}


@pytest.mark.parametrize("path", ["/health", "/health/ready"])
def test_health_endpoints_need_no_login(client, db, path) -> None:
    assert client.get(path).status_code == 200


def test_prometheus_metrics_are_exported(client, db) -> None:
    response = client.get("/metrics")

    assert response.status_code == 200
    assert b"django_http_requests" in response.content


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Bearer s3cret-metrics-token-but-longer", "Token s3cret-metrics-token", "Bearer"],
)
def test_metrics_with_a_token_set_refuse_requests_without_it(client, db, settings, authorization) -> None:
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    headers = {"Authorization": authorization} if authorization else {}

    response = client.get("/metrics", headers=headers)

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"django_http_requests" not in response.content


def test_metrics_with_a_token_set_answer_the_bearer_of_it(client, db, settings) -> None:
    settings.METRICS_TOKEN = "s3cret-metrics-token"

    response = client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"})

    assert response.status_code == 200
    assert b"dc_database_up" in response.content
