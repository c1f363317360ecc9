"""Request bodies over MAX_REQUEST_BODY_BYTES are refused from their headers, before a byte is read."""

import io
import json
import socket
import sys

import pytest
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.test import Client

FIFTY_MB = 50 * 1024 * 1024
ANONYMOUS_FORMS = ["/api/v1/auth/token", "/admin/login/"]


class UnreadableBody(io.RawIOBase):
    """A wsgi.input that fails the test if anything reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise AssertionError("the request body was read")


def call_wsgi(path: str, **environ: str) -> tuple[str, dict[str, str], bytes]:
    """Run one request through Django's real WSGI handler and middleware; returns status, headers, body."""
    answer = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info=None) -> None:
        answer["status"], answer["headers"] = status, dict(headers)

    body = WSGIHandler()(
        {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": path,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "HTTP_HOST": "127.0.0.1",
            "REMOTE_ADDR": "10.9.9.9",
            "wsgi.url_scheme": "http",
            "wsgi.input": UnreadableBody(),
            "wsgi.errors": sys.stderr,
            **environ,
        },
        start_response,
    )
    return answer["status"], answer["headers"], b"".join(body)


@pytest.mark.parametrize("path", ANONYMOUS_FORMS)
def test_a_50_mb_multipart_upload_is_refused_without_reading_it(db, path) -> None:
    status, headers, body = call_wsgi(
        path, CONTENT_TYPE="multipart/form-data; boundary=xyz", CONTENT_LENGTH=str(FIFTY_MB)
    )

    assert status.startswith("413")
    assert headers["Content-Type"] == "application/json"
    detail = json.loads(body)["detail"]
    assert str(FIFTY_MB) in detail
    assert str(settings.MAX_REQUEST_BODY_BYTES) in detail


@pytest.mark.parametrize("path", ANONYMOUS_FORMS)
def test_a_chunked_body_is_refused_without_reading_it(db, path) -> None:
    status, _, body = call_wsgi(path, CONTENT_TYPE="application/json", HTTP_TRANSFER_ENCODING="chunked")

    assert status.startswith("411")
    assert "Content-Length" in json.loads(body)["detail"]


def test_a_malformed_content_length_is_a_400(db) -> None:
    status, _, body = call_wsgi("/api/v1/auth/token", CONTENT_LENGTH="-5")

    assert status.startswith("400")
    assert "Content-Length" in json.loads(body)["detail"]


@pytest.mark.parametrize("path", ANONYMOUS_FORMS)
def test_a_live_server_answers_413_after_the_headers_alone(live_server, path) -> None:
    # A real socket to a real server: only the headers and a few bytes of the promised 50 MB are sent.
    host, port = live_server.thread.host, live_server.thread.port
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {FIFTY_MB}\r\n\r\n--xyz\r\n"
    )
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.encode())
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk

    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.split()[1] == b"413"
    assert b'"detail"' in rest


def test_bodies_under_the_limit_are_served(db, settings) -> None:
    settings.MAX_REQUEST_BODY_BYTES = 100
    client = Client()

    small = client.post("/api/v1/auth/token", {"username": "x", "password": "y"}, content_type="application/json")
    large = client.post("/api/v1/auth/token", {"username": "x" * 200, "password": "y"}, content_type="application/json")

    assert small.status_code == 400  # wrong credentials: the view ran
    assert large.status_code == 413
    assert "the limit is 100 bytes" in large.json()["detail"]


def test_django_refuses_what_the_middleware_would_too() -> None:
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE == settings.MAX_REQUEST_BODY_BYTES
