"""Riding out database outages: what counts as one, who says so, and how a step waits for the database.

Jobs are coordinated through the database, so a worker that loses it mid-step must neither give up on
its claimed runs (they would wait for their lease to expire) nor log a traceback per thread per second.
`ride_out(step)` runs a database step; while the database is unreachable it resets the connection and
tries again with short capped backoff, so the step lands as soon as the database is back. Steps given
to it must be idempotent: a step whose commit landed just before the connection dropped is run again.

`availability` is this process's view of the database: the first thread that finds it gone logs one
line, the first that reaches it again logs one line, whatever the number of threads and attempts.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from django.db import DatabaseError, InterfaceError, OperationalError, connection

from apps.jobs.models import backoff_seconds

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that say "the database did not answer", as opposed to a query it refused (IntegrityError, a
# bad statement): the connection was refused or dropped, the server is shutting down or starting up, a
# statement was cut off. Django wraps the driver's errors; raw psycopg ones can escape from code that
# talks to the driver directly.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)

# First wait between attempts and its cap: short, so a step lands within seconds of the database's return.
RETRY_BASE_SECONDS = 0.2
RETRY_MAX_SECONDS = 2.0
# A step that fails while a fresh connection answers is tried again this often (a connection broken by
# the outage fails once more after the database is back); beyond that its error is not an outage.
STALE_CONNECTION_RETRIES = 3


def is_database_error(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is the database not answering."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DATABASE_ERRORS):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def describe(exc: BaseException) -> str:
    """The first line of a database error (libpq's messages run over several lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class DatabaseUnavailable(Exception):
    """The database stayed unreachable longer than the caller would wait (or the caller was stopped)."""

    def __init__(self, seconds: float, error: str) -> None:
        super().__init__(f"database unavailable for {seconds:.0f} s ({error})")
        self.seconds = seconds
        self.error = error


class DatabaseAvailability:
    """Whether this process's last look at the database found it there; logs each change once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._error = ""
        # Outages seen so far, and when (time.monotonic()) the last one was noticed.
        self.outages = 0
        self.last_outage_at: float | None = None

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def down_for(self) -> float:
        """Seconds since this process found the database gone (0 while it is there)."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def error(self) -> str:
        return self._error

    def unavailable(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self._error = describe(exc)
            self.outages += 1
            self.last_outage_at = self._down_since
        # No traceback: the error says all an operator needs, and every thread of every worker meets it.
        logger.error("database unavailable: %s", self._error, extra={"error": self._error})

    def available(self) -> None:
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            seconds = time.monotonic() - self._down_since
            self._down_since, self._error = None, ""
        logger.warning("database available again after %.1f s", seconds, extra={"outage_seconds": round(seconds, 3)})


availability = DatabaseAvailability()


def reset_connection() -> None:
    """Drop this thread's connection: one the outage broke stays broken, Django never reconnects it."""
    with contextlib.suppress(DatabaseError, *DATABASE_ERRORS):
        connection.close()


def database_answers() -> bool:
    """Whether a fresh connection of this thread gets an answer (reported to `availability`)."""
    reset_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DATABASE_ERRORS as exc:
        reset_connection()
        availability.unavailable(exc)
        return False
    availability.available()
    return True


def ride_out(
    step: Callable[[], T],
    *,
    give_up_after: float | None = None,
    stopping: threading.Event | None = None,
) -> T:
    """Run the idempotent database `step` until it lands, through any outage; returns its result.

    Raises `DatabaseUnavailable` once the outage has lasted `give_up_after` seconds, or when `stopping`
    is set while the database is away; errors other than an outage pass through at once. Must be called
    outside any transaction: the connection is dropped between attempts.
    """
    attempt = stale = 0
    while True:
        try:
            result = step()
        except DATABASE_ERRORS as exc:
            error = exc
        else:
            availability.available()
            return result
        if database_answers():
            # The step's connection was broken (by an outage that is over) or the step hit a transient
            # error of its own (a deadlock): it is tried again at once, a few times.
            stale += 1
            if stale > STALE_CONNECTION_RETRIES:
                raise error
            continue
        attempt += 1
        if (stopping is not None and stopping.is_set()) or (
            give_up_after is not None and availability.down_for() >= give_up_after
        ):
            raise DatabaseUnavailable(availability.down_for(), describe(error)) from error
        pause = backoff_seconds(attempt, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS)
        if give_up_after is not None:
            pause = max(0.0, min(pause, give_up_after - availability.down_for()))
        if stopping is not None:
            stopping.wait(pause)
        else:
            time.sleep(pause)


def wait_for_database(*, give_up_after: float | None = None, stopping: threading.Event | None = None) -> None:
    """Return once the database answers (see `ride_out` for when it raises instead)."""
    ride_out(_probe, give_up_after=give_up_after, stopping=stopping)


def _probe() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
