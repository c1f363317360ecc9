"""Mistakes an operator makes at start-up get one clear line on stderr, never a traceback."""

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from django.conf import settings
from django.db import connection

pytestmark = pytest.mark.slow


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env={**os.environ, "SECRET_KEY": "x", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'LOUD'"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be json or text, not 'xml'"),
    ],
)
def test_a_bad_log_setting_is_one_line_naming_it(name: str, value: str, expected: str) -> None:
    assert_one_line(manage("check", **{name: value}), "Configuration error", expected)


def test_a_lower_case_log_level_is_accepted() -> None:
    assert manage("check", LOG_LEVEL="debug").returncode == 0


@pytest.fixture
def empty_database(django_db_blocker) -> Iterator[str]:
    """A PostgreSQL database nobody has run `migrate` on; yields its URL."""
    with django_db_blocker.unblock():
        db = connection.settings_dict
    name = f"dc_unmigrated_{uuid.uuid4().hex[:8]}"
    server = f"postgresql://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    "command",
    [
        ["run_scheduler", "--once"],
        ["seed_demo"],
        ["backfill", "--exchange", "simulated", "--symbol", "BTC/USDT", "--timeframe", "1m", "--since", "2024-01-01"],
        ["recompute_indicators", "--exchange", "simulated"],
        ["ensure_superuser"],
    ],
    ids=lambda command: command[0],
)
def test_a_command_run_before_migrate_says_to_migrate(empty_database: str, command: list[str]) -> None:
    result = manage(
        *command,
        DATABASE_URL=empty_database,
        DJANGO_SUPERUSER_USERNAME="admin",
        DJANGO_SUPERUSER_PASSWORD="a-long-password-1",
    )

    assert_one_line(result, "The database has no tables yet", "run `python manage.py migrate` first")
