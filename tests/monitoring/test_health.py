import socket

import pytest
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


def test_readiness_is_503_naming_the_database_when_it_is_unreachable(client, db, monkeypatch) -> None:
    # Breaking the shared test connection is not possible safely; the check's own failure path is what counts.
    def unreachable() -> dict[str, str]:
        return {"status": "error", "error": "OperationalError: connection refused"}

    monkeypatch.setattr(views, "_check_database", unreachable)

    response = client.get("/health/ready")

    assert response.status_code == 503
    assert response.json()["failing"] == ["database"]


@pytest.mark.parametrize("path", ["/health", "/health/ready"])
def test_health_endpoints_need_no_login(client, db, path) -> None:
    assert client.get(path).status_code == 200


def test_prometheus_metrics_are_exported(client, db) -> None:
    response = client.get("/metrics")

    assert response.status_code == 200
    assert b"django_http_requests" in response.content
