"""Riding out database outages, in process: one log line per change, retries, giving up.

A real outage under real processes is in test_database_outage.py. Here an unreachable database is a
real connection refused: one thread's connection pointed at a closed port of 127.0.0.1.
"""

import logging
import socket
import threading

import pytest
from django.db import OperationalError, connection

from apps.jobs import outages
from apps.jobs.outages import DatabaseAvailability, DatabaseUnavailable, is_database_error, ride_out


@pytest.fixture(autouse=True)
def availability(monkeypatch) -> DatabaseAvailability:
    """A tracker of the test's own: the process-wide one must not carry one test's outage into another."""
    tracker = DatabaseAvailability()
    monkeypatch.setattr(outages, "availability", tracker)
    return tracker


def outage_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "apps.jobs.outages"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_thread_without_database(work):
    """Run `work` in a thread whose connection points at a port nobody listens on; its result or error."""
    outcome: dict = {}

    def target() -> None:
        connection.settings_dict = {**connection.settings_dict, "HOST": "127.0.0.1", "PORT": closed_port()}
        try:
            outcome["result"] = work()
        except Exception as exc:
            outcome["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return outcome


def test_one_line_when_the_database_goes_and_one_when_it_returns_whatever_the_threads(availability, caplog):
    caplog.set_level(logging.INFO, logger="apps.jobs.outages")
    error = OperationalError("connection refused\nIs the server running on that host?")

    threads = [threading.Thread(target=lambda: [availability.unavailable(error) for _ in range(50)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert availability.down
    threads = [threading.Thread(target=lambda: [availability.available() for _ in range(50)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    messages = outage_messages(caplog)
    assert len(messages) == 2
    assert messages[0] == "database unavailable: connection refused"
    assert messages[1].startswith("database available again after ")
    assert not any(record.exc_info for record in caplog.records)
    assert not availability.down


@pytest.mark.django_db(transaction=True)  # ride_out drops the connection between attempts
def test_a_step_that_fails_on_a_broken_connection_is_tried_again_without_a_word(caplog):
    caplog.set_level(logging.INFO, logger="apps.jobs.outages")
    calls = []

    def step() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        with connection.cursor() as cursor:
            cursor.execute("SELECT 'landed'")
            return cursor.fetchone()[0]

    assert ride_out(step) == "landed"
    assert len(calls) == 2
    assert outage_messages(caplog) == []


@pytest.mark.django_db(transaction=True)
def test_a_database_error_while_the_database_answers_is_not_an_outage_and_is_raised():
    calls = []

    def deadlocked() -> None:
        calls.append(1)
        raise OperationalError("deadlock detected")

    with pytest.raises(OperationalError, match="deadlock"):
        ride_out(deadlocked)
    assert len(calls) == 1 + outages.STALE_CONNECTION_RETRIES


@pytest.mark.django_db(transaction=True)
def test_other_errors_pass_through_at_once():
    calls = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        ride_out(broken)
    assert len(calls) == 1


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_database_is_given_up_on_after_the_limit(availability, caplog):
    caplog.set_level(logging.INFO, logger="apps.jobs.outages")

    def query() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    outcome = in_thread_without_database(lambda: ride_out(query, give_up_after=0))

    assert isinstance(outcome["error"], DatabaseUnavailable)
    assert str(outcome["error"]).startswith("database unavailable for 0 s (")
    (message,) = outage_messages(caplog)
    assert message.startswith("database unavailable: ")
    assert availability.down
    # The next step that reaches the database ends the outage, in one line.
    assert ride_out(lambda: "back") == "back"
    assert outage_messages(caplog)[1].startswith("database available again after ")


@pytest.mark.django_db(transaction=True)
def test_a_stopped_worker_stops_waiting_for_the_database():
    stopping = threading.Event()
    stopping.set()

    outcome = in_thread_without_database(lambda: outages.wait_for_database(stopping=stopping))

    assert isinstance(outcome["error"], DatabaseUnavailable)


def test_database_errors_are_recognised_through_their_causes():
    wrapped = RuntimeError("while saving the cursor")
    wrapped.__cause__ = OperationalError("the database system is shutting down")

    assert is_database_error(wrapped)
    assert not is_database_error(ValueError("bad input"))
