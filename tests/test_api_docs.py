"""Swagger UI comes from the project's own static files (drf-spectacular-sidecar); schema and docs need a login."""

import re

import pytest
from django.contrib.staticfiles import finders
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient


@pytest.fixture
def logged_in(client, user) -> Client:
    client.force_login(user)
    return client


def test_swagger_ui_references_no_external_host(logged_in) -> None:
    page = logged_in.get("/api/docs/").content.decode()

    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|["'](https?://[^"']+)["']""", page)
    urls = [url for pair in urls for url in pair if url]
    assert urls, "the page references no script or style"
    assert not [url for url in urls if re.match(r"^(https?:)?//", url)], urls
    # Every script, style and icon is a static file the project serves itself.
    for url in urls:
        assert url.startswith("/static/"), url
        assert finders.find(url.removeprefix("/static/")), url
    assert "swagger-ui-bundle.js" in page


@pytest.mark.parametrize("path", ["/api/schema/", "/api/docs/"])
def test_schema_and_docs_need_a_login(client, db, path) -> None:
    assert client.get(path).status_code in (401, 403)


def test_the_schema_is_served_with_a_token(user) -> None:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")

    assert api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").status_code == 200
