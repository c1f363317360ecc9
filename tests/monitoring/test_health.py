import json
import os
import socket
import subprocess
import sys

import pytest
from django.conf import settings
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


def test_readiness_is_200_when_the_database_answers(client, db) -> None:
    response = client.get("/health/ready")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": {"status": "ok"}}}


def test_readiness_is_503_naming_mongodb_when_it_is_unreachable(client, db, monkeypatch) -> None:
    # A shorter server selection than production's keeps the test quick; the code path is the same.
    monkeypatch.setattr(views, "MONGODB_TIMEOUT_MS", 200)

    with override_settings(MONGODB_URI=f"mongodb://127.0.0.1:{closed_port()}/"):
        response = client.get("/health/ready")

    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["mongodb"]
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["checks"]["mongodb"]["status"] == "error"


def test_readiness_is_503_naming_the_database_when_it_is_unreachable() -> None:
    # A separate process whose DATABASE_URL points at a closed port: the test's own connection stays intact.
    probe = (
        "import json; from django.test import Client; "
        "r = Client().get('/health/ready', HTTP_HOST='127.0.0.1'); "
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
    assert json.loads(body)["failing"] == ["database"]
    assert "OperationalError" in json.loads(body)["checks"]["database"]["error"]


@pytest.mark.parametrize("path", ["/health", "/health/ready"])
def test_health_endpoints_need_no_login(client, db, path) -> None:
    assert client.get(path).status_code == 200


def test_prometheus_metrics_are_exported(client, db) -> None:
    response = client.get("/metrics")

    assert response.status_code == 200
    assert b"django_http_requests" in response.content
