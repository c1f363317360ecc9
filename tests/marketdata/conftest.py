"""Candle store backends for tests.

`candle_store` runs a test once per backend: the SQL table on the test database (PostgreSQL), MongoDB
on mongomock-ng (an in-process fake: there is no MongoDB server here), and a real MongoDB when the
environment sets MONGODB_URI (in a throwaway database dropped afterwards). Use `sql_store`,
`mongomock_store` or `mongodb_store` to pick one.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mongomock_ng
import pytest

from apps.marketdata import mongostore, store
from datacollector.config import get_config

BASE_CONFIG = Path(__file__).resolve().parents[2] / "config" / "collector.yaml"


@pytest.fixture
def sql_store(db, settings):
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    yield "sql"
    store.reset_mongo_client()


# The Mongo variants take `db` too: candles live in MongoDB, but the indicator set in force, gaps and
# series statistics are read from the Django database.
@pytest.fixture
def mongomock_store(db, settings):
    settings.MONGODB_URI = "mongodb://mongomock.invalid:27017"
    settings.MONGODB_DATABASE = "dc_store"
    store.set_mongo_client(mongomock_ng.MongoClient(tz_aware=True))
    yield "mongomock"
    store.reset_mongo_client()


@pytest.fixture
def mongodb_store(db, settings):
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        pytest.skip("set MONGODB_URI to run the store contract against a real MongoDB")
    settings.MONGODB_URI = uri
    settings.MONGODB_DATABASE = f"dc_store_test_{uuid.uuid4().hex[:12]}"
    store.reset_mongo_client()
    yield "mongodb"
    mongostore.get_client().drop_database(settings.MONGODB_DATABASE)
    store.reset_mongo_client()


# The real-MongoDB variant exists only when a server is configured, so runs without one are not
# cluttered with dozens of skips.
BACKENDS = ["sql", "mongomock", *(["mongodb"] if os.environ.get("MONGODB_URI") else [])]


@pytest.fixture(params=BACKENDS)
def candle_store(request) -> str:
    """The name of the backend the store functions now use; the test runs once per backend."""
    return request.getfixturevalue(f"{request.param}_store")


def run_on_sqlite(script: str, database: Path, stdin: str | None = None) -> dict:
    """Run `script` in a child process on a fresh SQLite file with the embedded store (the suite's own
    database is PostgreSQL); returns the JSON object the script prints last."""
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{database}",
        "MONGODB_URI": "",
        "DEBUG": "1",
        "DJANGO_SETTINGS_MODULE": "datacollector.settings",
    }
    child = subprocess.run(
        [sys.executable, "-c", script],
        input=stdin,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.fixture
def retention_config(settings, tmp_path):
    """collector.yaml with `retention.days` replaced by the given mapping."""

    def configure(days: dict[str, int]) -> None:
        path = tmp_path / "collector.yaml"
        text = BASE_CONFIG.read_text().replace("retention:\n  days: {}", f"retention:\n  days: {days!r}")
        path.write_text(text)
        settings.COLLECTOR_CONFIG = str(path)
        get_config.cache_clear()

    yield configure
    get_config.cache_clear()
