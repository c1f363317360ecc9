"""The production server as the Dockerfile starts it: gunicorn with uvicorn workers, DEBUG off, static
files collected and served by WhiteNoise, JSON access logs with a request id."""

import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

pytestmark = pytest.mark.slow

DOCKERFILE = Path(settings.BASE_DIR) / "Dockerfile"


def dockerfile_command() -> list[str]:
    """The image's CMD (exec form), exactly as written."""
    line = next(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD "))
    return json.loads(line.removeprefix("CMD "))


def database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The Dockerfile's command against the test database; yields its base URL and its log file."""
    static_root = tmp_path_factory.mktemp("static")
    log = tmp_path_factory.mktemp("log") / "server.log"
    port = free_port()
    with django_db_blocker.unblock():
        url = database_url()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1",
        "DATABASE_URL": url,
        "STATIC_ROOT": str(static_root),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "WEB_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
    }
    # The image build's step, then the image's command.
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"],
        cwd=settings.BASE_DIR,
        env=env,
        check=True,
        timeout=300,
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            dockerfile_command(), cwd=settings.BASE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"{shlex.join(dockerfile_command())} exited:\n{log.read_text()}"
            try:
                get(f"{base}/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield base, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_image_command_is_gunicorn_with_uvicorn_workers_on_the_asgi_app() -> None:
    command = " ".join(dockerfile_command())
    assert "gunicorn datacollector.asgi:application -k datacollector.workers.UvicornWorker" in command
    assert "${WEB_BIND" in command
    assert "${WEB_CONCURRENCY" in command


def test_health_answers(server) -> None:
    base, _log = server
    status, _headers, body = get(f"{base}/health")
    assert status == 200
    assert json.loads(body) == {"status": "ok"}


def test_the_admin_login_page_and_its_stylesheet_are_served(server) -> None:
    base, _log = server
    status, _headers, page = get(f"{base}/admin/login/")
    assert status == 200
    stylesheet = re.search(rb'href="(/static/admin/css/base\.[0-9a-f]{12}\.css)"', page)
    assert stylesheet, "the login page links no hashed admin stylesheet"

    status, headers, css = get(f"{base}{stylesheet.group(1).decode()}", **{"Accept-Encoding": "gzip"})

    assert status == 200
    assert headers["Content-Type"].startswith("text/css")
    assert headers.get("Content-Encoding") == "gzip"  # the compressed copy collectstatic made
    assert "immutable" in headers["Cache-Control"]  # a hashed name never changes content
    assert len(css) > 100


def test_each_request_is_logged_as_json_with_its_request_id(server) -> None:
    base, log = server
    status, headers, _body = get(f"{base}/health", **{"X-Request-ID": "probe-42"})
    assert status == 200
    assert headers["X-Request-ID"] == "probe-42"
    _status, headers, _body = get(f"{base}/health/ready")
    generated = headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)

    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        access = {line.get("request_id"): line for line in lines if line.get("logger") == "datacollector.access"}
        if {"probe-42", generated} <= access.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert access["probe-42"]["path"] == "/health"
    assert access["probe-42"]["status"] == 200
    assert access["probe-42"]["method"] == "GET"
    assert access[generated]["path"] == "/health/ready"
