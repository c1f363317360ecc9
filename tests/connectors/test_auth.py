import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from tests.conftest import grant

API_PATHS = [
    "/api/v1/",
    "/api/v1/connectors/",
    "/api/v1/jobs/",
    "/api/v1/jobs/bulk",
    "/api/v1/runs/",
    "/api/v1/ratelimits/",
    "/api/v1/exchanges",
]


@pytest.mark.parametrize("path", API_PATHS)
def test_anonymous_requests_are_refused(anon_client, db, path) -> None:
    assert anon_client.get(path).status_code in (401, 403)
    assert anon_client.post(path, {}, format="json").status_code in (401, 403)


def test_actions_are_refused_to_anonymous_clients(anon_client, job, simulated) -> None:
    assert anon_client.post(f"/api/v1/jobs/{job.pk}/pause/").status_code in (401, 403)
    assert anon_client.post(f"/api/v1/connectors/{simulated.pk}/stop/").status_code in (401, 403)
    assert anon_client.delete(f"/api/v1/jobs/{job.pk}/").status_code in (401, 403)
    job.refresh_from_db()
    assert job.status == "active"


def test_token_from_the_auth_endpoint_opens_the_api(db) -> None:
    grant(get_user_model().objects.create_user("robot", password="robot-password-1"), "view_job")
    client = APIClient()

    bad = client.post("/api/v1/auth/token", {"username": "robot", "password": "wrong"}, format="json")
    good = client.post("/api/v1/auth/token", {"username": "robot", "password": "robot-password-1"}, format="json")

    assert bad.status_code == 400
    assert good.status_code == 200
    client.credentials(HTTP_AUTHORIZATION=f"Token {good.data['token']}")
    assert client.get("/api/v1/jobs/").status_code == 200


def test_browsable_api_renders_html_for_a_logged_in_user(client, user) -> None:
    client.force_login(user)

    root = client.get("/api/v1/", HTTP_ACCEPT="text/html")
    jobs = client.get("/api/v1/jobs/", HTTP_ACCEPT="text/html")

    assert root.status_code == 200
    assert b"/api/v1/connectors" in root.content
    assert jobs.status_code == 200
    assert b"exchange_id" in jobs.content


def test_schema_and_swagger_ui_are_served_to_a_logged_in_user(client, user) -> None:
    client.force_login(user)

    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    docs = client.get("/api/docs/")

    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert any(p.startswith("/api/v1/jobs") and "bulk" in p for p in paths)
    assert docs.status_code == 200


def test_api_root_links_every_endpoint(api_client) -> None:
    response = api_client.get("/api/v1/")

    assert {"connectors", "jobs", "runs", "ratelimits", "exchanges", "auth/token", "data/export"} <= set(response.data)
