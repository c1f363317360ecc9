"""The production values documented in .env.example pass `check --deploy`; the defaults keep plain http working."""

import os
import re
import secrets
import subprocess
import sys

import pytest
from django.conf import settings

ENV_EXAMPLE = settings.BASE_DIR / ".env.example"


def documented_values() -> dict[str, str]:
    """The variables .env.example sets (uncommented NAME=value lines)."""
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_reports_nothing_with_the_documented_production_values() -> None:
    env = documented_values()
    for name in ("SECURE_HSTS_SECONDS", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE"):
        assert name in env, f".env.example documents no {name}"
    # .env.example's SECRET_KEY is a placeholder: production sets a long random one, as it says.
    env.update(DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50))

    result = manage("check", "--deploy", "--fail-level", "WARNING", **env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_warns_without_them() -> None:
    # The same check does see the difference: with the defaults (plain http), it warns.
    result = manage("check", "--deploy", "--fail-level", "WARNING", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50))

    assert result.returncode != 0
    for code in ("W004", "W008", "W012", "W016"):
        assert code in result.stderr + result.stdout


def test_a_malformed_proxy_ssl_header_stops_the_start_with_the_expected_form() -> None:
    result = manage("check", DEBUG="1", SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO")

    assert result.returncode != 0
    assert "HTTP_X_FORWARDED_PROTO,https" in result.stderr


def test_the_defaults_serve_plain_http(client, db) -> None:
    assert not settings.SECURE_SSL_REDIRECT
    assert not settings.SESSION_COOKIE_SECURE
    assert client.get("/admin/login/").status_code == 200


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/metrics"])
def test_probes_and_metrics_are_not_redirected_to_https(client, db, settings, path) -> None:
    settings.SECURE_SSL_REDIRECT = True

    assert client.get(path).status_code == 200
    assert client.get("/admin/login/").status_code == 301
