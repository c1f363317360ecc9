"""Access lines and the web's error logs carry the request's id (datacollector.access_log)."""

import io
import json
import logging
from collections.abc import Iterator

import pytest
from django.test import Client


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """What the configured console handler (settings.LOGGING: JSON, request-id filter) writes."""
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler))
    buffer = io.StringIO()
    previous = handler.setStream(buffer)
    try:
        yield buffer
    finally:
        handler.setStream(previous)


def records(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


@pytest.mark.urls("tests.monitoring.error_urls")
def test_an_unhandled_error_is_logged_with_the_request_id_of_its_access_line(log_lines) -> None:
    client = Client(raise_request_exception=False)

    response = client.get("/fail", headers={"X-Request-ID": "req-7"})

    assert response.status_code == 500
    assert response["X-Request-ID"] == "req-7"
    logged = records(log_lines)
    error = next(r for r in logged if r["logger"] == "django.request")
    assert error["level"] == "ERROR"
    assert error["request_id"] == "req-7"
    assert "boom in a view" in error["exc_info"]
    access = next(r for r in logged if r["logger"] == "datacollector.access")
    assert (access["request_id"], access["status"], access["path"]) == ("req-7", 500, "/fail")


def test_an_unusable_request_id_is_replaced_by_a_new_one(client, log_lines) -> None:
    response = client.get("/health", headers={"X-Request-ID": "has spaces\tand tabs"})

    assert response.status_code == 200
    rid = response["X-Request-ID"]
    assert len(rid) == 32
    assert records(log_lines)[-1]["request_id"] == rid


def test_lines_logged_outside_a_request_have_no_request_id(log_lines) -> None:
    logging.getLogger("apps.jobs.scheduler").warning("between requests")

    assert "request_id" not in records(log_lines)[-1]
