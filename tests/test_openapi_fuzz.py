"""schemathesis over every operation of the API's OpenAPI schema, against a live server.

The server is `manage.py runserver` in a child process on the test database (tests/fuzz_settings.py), so
requests cross a real socket and a real WSGI stack, with DEBUG off as in production. Requests carry a superuser's token;
throttles are raised out of the fuzzer's way through the environment (THROTTLE_*). Generation is
derandomized with a bounded number of examples per operation: SCHEMATHESIS_MAX_EXAMPLES (default 8)
runs it harder. No answer may be a 5xx, use a status code or content type the schema does not list,
or break the documented body or headers.

Every operation starts from the same seeded rows (a simulated connector, a job, a finished and a
running run, a rate limit, candles and indicators), all with the id SEED_ID, and a generated `{id}`
is often that id: detail endpoints, filters and the destructive operations (DELETE, start, stop,
pause, run-now) act on real rows instead of only answering 404.
"""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token

from apps.connectors.models import Connector
from apps.jobs.models import Job, Run
from apps.marketdata import indicators, store
from apps.ratelimits.models import RateLimit

ROOT = Path(__file__).resolve().parents[1]
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "8"))
# Far above what the sequences reach during a run, so that rows the fuzzer creates never take it.
SEED_ID = 4242
SERIES = ("simulated", "BTC/USDT", "1m")
FIRST_TS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
]


def seed_rows() -> None:
    """The rows every operation starts from; whatever an earlier operation made or deleted is reset."""
    Connector.objects.all().delete()  # its jobs and their runs go with it
    RateLimit.objects.all().delete()
    # Created before the connector, whose save() then configures this row rather than adding one.
    RateLimit.objects.create(id=SEED_ID, exchange_id="simulated", capacity=100, refill_per_second=10, tokens=100)
    connector = Connector.objects.create(id=SEED_ID, exchange_id="simulated", name="Simulated (fuzz seed)")
    job = Job.objects.create(id=SEED_ID, connector=connector, symbol="BTC/USDT", timeframe="1m", cursor=FIRST_TS)
    now = timezone.now()
    Run.objects.create(
        id=SEED_ID,
        job=job,
        worker="fuzz",
        status=Run.Status.SUCCESS,
        started_at=now - timedelta(seconds=3),
        finished_at=now,
        candles_fetched=300,
        candles_written=300,
        requests=1,
    )
    Run.objects.create(job=job, worker="fuzz")  # still running: no finished_at, no duration


def seed_series() -> None:
    """Candles and indicators: the data API only reads them, so they are written once."""
    candles = [[FIRST_TS + i * 60_000, 100 + i % 7, 101 + i % 7, 99 + i % 7, 100.5 + i % 7, 10.0] for i in range(300)]
    store.upsert_candles(*SERIES, candles)
    indicators.recompute_series(*SERIES)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def database_url() -> str:
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def embedded_store(settings) -> Iterator[None]:
    """Candles in the test database (the server child process is given no MONGODB_URI either)."""
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    yield
    store.reset_mongo_client()


@pytest.fixture
def live_server_process(transactional_db, embedded_store, tmp_path) -> Iterator[str]:
    """`manage.py runserver` on the test database (committed rows: transactional_db); yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.fuzz_settings",
        "DATABASE_URL": database_url(),
        "MONGODB_URI": "",
        "SECRET_KEY": "fuzz-only",
        "DEBUG": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
        # The fuzzer is one client sending thousands of requests: no throttle may answer it 429.
        "THROTTLE_USER": "1000000/minute",
        "THROTTLE_ANON": "1000000/minute",
        "THROTTLE_TOKEN_IP": "1000000/minute",
        "THROTTLE_TOKEN_USERNAME": "1000000/minute",
        "AXES_FAILURE_LIMIT": "1000000",
        "LOG_LEVEL": "ERROR",  # tracebacks only, no line per request
    }
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        # The server's log holds the traceback of any 5xx: shown with the test's output when it fails.
        sys.stdout.write(log.read_text()[-20_000:])


@pytest.fixture
def superuser_token(transactional_db) -> str:
    user = get_user_model().objects.create_superuser("fuzzer", "fuzzer@example.com", "fuzzer-password-1")
    return Token.objects.create(user=user).key


@pytest.fixture
def api_schema(live_server_process: str, superuser_token: str) -> schemathesis.BaseSchema:
    seed_series()
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Token {superuser_token}"},
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "suppress-health-check": ["all"],
        }
    )
    schema = schemathesis.openapi.from_url(
        f"{live_server_process}/api/schema/?format=json",
        config=config,
        wait_for_schema=60,
        headers={"Authorization": f"Token {superuser_token}"},
    )

    @schema.hook("before_generate_path_parameters")
    def often_the_seeded_row(context: schemathesis.HookContext, strategy: st.SearchStrategy) -> st.SearchStrategy:
        if context.operation is not None and "{id}" in context.operation.path:
            return st.one_of(st.just({"id": SEED_ID}), strategy)
        return strategy

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


class Seeder:
    """Resets the seeded rows whenever the fuzzer moves on to another operation."""

    def __init__(self) -> None:
        self.operation: str | None = None

    def before(self, case: Any) -> None:
        if case.operation.label != self.operation:
            self.operation = case.operation.label
            seed_rows()


@pytest.fixture
def seeder(transactional_db) -> Seeder:
    return Seeder()


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32.5 names each operation's subtest through `node._nodeid`, which pytest 9 no longer
    # has (it keeps `_id`); giving the node the attribute back is all it needs.
    request.node._nodeid = request.node.nodeid


@schema.parametrize()
@pytest.mark.slow
def test_no_input_gives_a_server_error_or_an_undocumented_answer(case, seeder: Seeder) -> None:
    seeder.before(case)
    case.call_and_validate()


def test_the_schema_documents_the_errors_of_every_operation(api_client) -> None:
    paths = api_client.get("/api/schema/", {"format": "json"}).json()["paths"]

    for path, operations in paths.items():
        for method, operation in operations.items():
            documented = set(operation["responses"])
            locations = {parameter["in"] for parameter in operation.get("parameters", [])}
            assert "403" in documented, (method, path)
            if "path" in locations:
                assert "404" in documented, (method, path)
            if "query" in locations or "requestBody" in operation:
                assert "400" in documented, (method, path)
            if "requestBody" in operation:
                assert {"411", "413", "415"} <= documented, (method, path)
