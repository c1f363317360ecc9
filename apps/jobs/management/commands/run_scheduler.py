"""Claim due jobs, collect them, release them, forever (or until nothing is due, with --once).

Any number of these processes, on any number of machines, share the work through the database:
claims use SELECT ... FOR UPDATE SKIP LOCKED with a lease, so a worker that dies only delays its jobs
until the lease expires. The worker threads of one process share each claimed batch, and each has its
own database connection.

A database outage stalls the workers, never their jobs: claims, starts and releases are retried
(`apps.jobs.outages.ride_out`) until the database answers, so every claimed job is run or released as
soon as it is back, and the process logs one line when the database goes and one when it returns.
"""

import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections, connection, connections
from django.utils.module_loading import import_string
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from apps.connectors.exchanges import PermanentExchangeError
from apps.jobs.collect import CollectionFailed
from apps.jobs.models import Job, LeaseLost, Run, Task
from apps.jobs.outages import (
    DatabaseUnavailable,
    availability,
    database_answers,
    describe,
    is_database_error,
    reset_connection,
    ride_out,
    wait_for_database,
)
from apps.jobs.tasks import run_task
from apps.marketdata.exports import SWEEP_EVERY_SECONDS, delete_expired_files
from apps.marketdata.retention import schedule_daily_purge
from apps.monitoring import live
from apps.monitoring import metrics as fleet_metrics
from apps.monitoring.fleet import Membership
from datacollector.config import get_config
from datacollector.migrations_state import missing_table_message

logger = logging.getLogger("apps.jobs.scheduler")

DEFAULT_COLLECTOR = "apps.jobs.collect.collect_job"

RUNS = Counter("dc_scheduler_runs_total", "Job runs finished by this process, by outcome.", ["outcome"])
CANDLES_WRITTEN = Counter("dc_scheduler_candles_written_total", "Candles stored by this process's runs.")
RUN_SECONDS = Histogram(
    "dc_scheduler_run_duration_seconds",
    "Wall time of one job run.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
BUSY = Gauge("dc_scheduler_busy_workers", "Worker threads of this process running a job right now.")

Collector = Callable[[Job, Run, Callable[[], None]], Any]

# Releases commit asynchronously (`Run._release_in_one_statement`), so a database crash forgets those of
# the last moments (up to three WAL writer delays, 600 ms by default) and their jobs would wait for their
# leases. Releases this recent when an outage is noticed are applied again once it is over: applying a
# release twice changes nothing. Generous, because an idle worker notices an outage one poll late.
REPLAY_RELEASES_SECONDS = 5.0


# How long a worker thread keeps its database connection when CONN_MAX_AGE (meant for web requests) says to
# close it after each: the worker loop's close_old_connections() would otherwise open a new connection for
# every run, a PostgreSQL backend start and Django's connection set-up each time. Broken connections are
# still replaced at once.
WORKER_CONN_MAX_AGE_SECONDS = 300


def keep_worker_connections() -> None:
    """Let this process's worker threads keep their connections (see WORKER_CONN_MAX_AGE_SECONDS)."""
    for alias in connections:
        if connections.settings[alias].get("CONN_MAX_AGE") == 0:
            connections.settings[alias]["CONN_MAX_AGE"] = WORKER_CONN_MAX_AGE_SECONDS


class Scheduler:
    """The work of one `run_scheduler` process, shared by its worker threads.

    A worker that finds nothing queued claims a batch; the batch's runs are then handed out one at a
    time to whichever worker is free, so a few due jobs still run in parallel. With `workers` given, a
    batch is at most as large as the number of workers free to start it now: jobs a busy process would
    only queue are left to another process's idle workers, and no claimed job waits behind its batch
    (longer than its lease, at worst). `process_one()` is the step: run one job, True if there was one.
    `work()` is a worker thread's loop.
    """

    def __init__(
        self,
        worker_id: str,
        collector: Collector,
        *,
        batch_size: int,
        lease_seconds: float,
        schedule_delay_seconds: float,
        backoff_base_seconds: float,
        backoff_max_seconds: float,
        interval: float = 1.0,
        stopping: threading.Event | None = None,
        workers: int | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.workers = workers
        self.collector = collector
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.schedule_delay_seconds = schedule_delay_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.interval = interval
        self.stopping = stopping or threading.Event()
        self._queue: deque[Run] = deque()
        self._running = 0  # runs handed to a worker and not finished yet
        self._lock = threading.Lock()
        # Claims of this process on their way, and a condition to wait for them under `_lock`.
        self._claiming = 0
        self._claimed = threading.Condition(self._lock)
        self._claims = itertools.count()
        self._last_reap = 0.0
        self._last_export_sweep = 0.0
        self._recent_releases: deque[tuple[float, Callable[[], Any]]] = deque()
        self._outages_seen = availability.outages

    def next_run(self) -> Run | None:
        """A claimed run to execute, claiming a new batch when none is left; None when nothing is due.

        The claim itself runs outside the lock: at a minute's close every worker finishing a run claims
        its next one, and claims made one at a time under the lock left half the workers waiting for it.
        While a claim is on its way, the workers it may claim for count as running, so that concurrent
        claims of this process together never take more jobs than it has workers free to start them.
        """
        with self._lock:
            if self._queue:
                self._running += 1
                return self._queue.popleft()
            if self.stopping.is_set():
                return None
            limit = self.claim_limit()
            self._running += limit
            self._claiming += 1
            # Each claim gets its own lease owner, "<worker id>/<claim number>": a job whose lease expired
            # and that this same process reclaims is then told apart from the stale claim, whose heartbeat
            # and release must fail.
            owner = f"{self.worker_id}/{next(self._claims)}"
        runs: list[Run] = []
        try:
            runs = self._claim(owner, limit)
        finally:
            with self._lock:
                self._running -= limit
                self._claiming -= 1
                if runs:
                    # One for this worker; the rest for the free workers that were counted for them.
                    self._running += 1
                    self._queue.extend(runs[1:])
                self._claimed.notify_all()
        if runs:
            return runs[0]
        with self._lock:
            # A sibling's claim may hold the due jobs this one skipped as locked: wait for it and take one
            # of them rather than idle while they wait in its queue.
            while not self._queue and self._claiming and not self.stopping.is_set():
                self._claimed.wait(timeout=1.0)
            if not self._queue:
                return None
            self._running += 1
            return self._queue.popleft()

    def claim_limit(self) -> int:
        """How many jobs a claim takes: the batch size, or fewer when fewer workers are free to start them
        now (this one included; the caller holds the lock)."""
        if self.workers is None:
            return self.batch_size
        return max(1, min(self.batch_size, self.workers - self._running))

    def _claim(self, owner: str, limit: int) -> list[Run]:
        """Claim up to `limit` jobs for `owner`, through a database outage (none when stopped meanwhile)."""
        attempts = 0

        def claim() -> list[Run]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                # An earlier attempt may have committed before its answer was lost with the connection:
                # its jobs are leased to `owner`, so carry on with them rather than leave them to expire.
                held = Run.objects.held_by(owner)
                if held:
                    return held
            return Job.objects.claim(owner, limit, self.lease_seconds)

        try:
            return ride_out(claim, stopping=self.stopping)
        except DatabaseUnavailable:
            return []

    def process_one(self) -> bool:
        """Run one due job, or when none is due one background task; False when there was neither."""
        run = self.next_run()
        if run is None:
            return self.process_task()
        try:
            if self.stopping.is_set():
                self.release_unstarted([run])
            else:
                self.execute(run)
        finally:
            with self._lock:
                self._running -= 1
        return True

    def process_task(self) -> bool:
        """Claim and run one background task (export, recompute, purge); False when none is pending.

        Only a worker that found no due job gets here, so tasks never delay candle collection.
        """
        if self.stopping.is_set():
            return False
        task = Task.objects.claim(f"{self.worker_id}/t{next(self._claims)}", self.lease_seconds)
        if task is None:
            return False
        # Counted as running, so this process's job claims leave the busy worker out.
        with self._lock:
            self._running += 1
        BUSY.inc()
        try:
            run_task(task)
        finally:
            BUSY.dec()
            with self._lock:
                self._running -= 1
        return True

    def release_claimed(self) -> None:
        """Give back every claimed run no worker has started (on shutdown)."""
        with self._lock:
            runs = list(self._queue)
            self._queue.clear()
        self.release_unstarted(runs)

    def release_unstarted(self, runs: list[Run]) -> None:
        for run in runs:
            try:
                # Through an outage too: a job given back is due again for any worker at once.
                ride_out(run.release_unstarted)
            except Exception:
                # Not fatal: the lease expires and another worker takes the job anyway.
                logger.exception("could not release job %s on shutdown", run.job_id, extra={"job_id": run.job_id})

    def work(self, once: bool = False) -> None:
        """A worker thread's loop, until stopped (or, with `once`, until nothing is due)."""
        try:
            while not self.stopping.is_set():
                try:
                    close_old_connections()
                    self.replay_releases_after_outage()
                    found = self.process_one()
                except Exception as exc:
                    if is_database_error(exc) and not database_answers():
                        # A step that does not ride out outages itself met one: wait for the database
                        # (logged once per process by `availability`), not a traceback per second.
                        with contextlib.suppress(DatabaseUnavailable):
                            wait_for_database(stopping=self.stopping)
                        continue
                    # Never spin on a bug: log, wait, try again.
                    logger.exception("scheduler step failed", extra={"worker": self.worker_id})
                    self.stopping.wait(self.interval)
                    continue
                if found:
                    continue
                if once:
                    break
                self.reap()
                # Event.wait returns at once when a signal sets the flag.
                self.stopping.wait(self.interval)
            self.release_claimed()
        finally:
            connection.close()

    def reap(self) -> None:
        """Close orphaned runs no reclaim will close, at most every half lease; then queue the day's purge
        and, every SWEEP_EVERY_SECONDS, delete expired exports' files."""
        if time.monotonic() - self._last_reap < self.lease_seconds / 2:
            return
        self._last_reap = time.monotonic()
        try:
            closed = Run.objects.close_orphaned()
        except Exception as exc:
            if is_database_error(exc):
                # The next claim meets the outage and waits for the database; this can wait half a lease.
                reset_connection()
                return
            logger.exception("closing orphaned runs failed", extra={"worker": self.worker_id})
            return
        if closed:
            logger.info("closed %s orphaned runs", closed, extra={"worker": self.worker_id, "closed": closed})
        try:
            # Idle now and then anyway: queue the day's retention purge (once a day across the fleet).
            schedule_daily_purge()
        except Exception:
            logger.exception("queueing the daily purge failed", extra={"worker": self.worker_id})
        if time.monotonic() - self._last_export_sweep >= SWEEP_EVERY_SECONDS:
            self._last_export_sweep = time.monotonic()
            try:
                delete_expired_files()
            except Exception:
                logger.exception("deleting expired export files failed", extra={"worker": self.worker_id})

    def execute(self, run: Run) -> str:
        """Run one claimed job and record its outcome; never raises for the job's own failures."""
        job = run.job
        started = time.monotonic()
        result: Any = None
        error = ""
        try:
            # The run is ours until released: through an outage it is started (or found lost) once the
            # database is back, never left to its lease.
            ride_out(lambda: run.begin(self.lease_seconds))
        except LeaseLost:
            # It waited behind its batch longer than the lease and was reclaimed: not ours any more.
            self._log(run, "lease_lost", result, started, "lease lost before start")
            return "lease_lost"
        live.run_started(run)  # the hub's `jobs` channel, after begin() committed
        BUSY.inc()
        try:
            result = self.collector(job, run, run.heartbeat(self.lease_seconds))
        except Exception as raised:
            # `collect_job` hands back what it did before failing (a stand-in collector may raise plainly).
            exc, partial = (raised.error, raised.result) if isinstance(raised, CollectionFailed) else (raised, None)
            outcome, error = self._record_failure(run, exc, partial)
        else:
            outcome = "success"
            self._record(lambda: run.succeed(result, self.schedule_delay_seconds))
        finally:
            BUSY.dec()
        if outcome == "success" and run.status != Run.Status.SUCCESS:
            outcome = "lease_lost"
        RUNS.labels(outcome).inc()
        CANDLES_WRITTEN.inc(getattr(result, "candles_written", 0) or 0)
        RUN_SECONDS.observe(time.monotonic() - started)
        self._log(run, outcome, result, started, error)
        if outcome != "lease_lost":
            # After the release committed: the job's state, the run's candles and indicators, gaps, bucket.
            live.run_finished(run, result)
        return outcome

    def _record_failure(self, run: Run, exc: Exception, partial: Any) -> tuple[str, str]:
        """Record a run that `exc` ended (with `partial`, what it did before); returns (outcome, error)."""
        job = run.job
        if isinstance(exc, LeaseLost):
            return "lease_lost", str(exc)
        if isinstance(exc, PermanentExchangeError):
            error = str(exc) or type(exc).__name__
            logger.warning(
                "job %s stopped: %s", job.pk, error, extra={"job_id": job.pk, "worker": run.worker, "error": error}
            )
            self._record(lambda: run.fail_permanently(error, partial))
            return "error", error
        if is_database_error(exc):
            # The database, not the exchange, failed: the outage is logged once per process, and the
            # run is released (failed, retried after the usual backoff) as soon as the database is back.
            error = f"database error: {describe(exc)}"
            reset_connection()
        else:
            error = f"{type(exc).__name__}: {exc}"
            logger.exception("job %s failed", job.pk, extra={"job_id": job.pk, "worker": run.worker}, exc_info=exc)
        retry_after = getattr(exc, "retry_after", None)
        self._record(
            lambda: run.fail(
                error,
                self.backoff_base_seconds,
                self.backoff_max_seconds,
                retry_after if isinstance(retry_after, int | float) else None,
                partial,
            )
        )
        return "failed", error

    def _record(self, release: Callable[[], Any]) -> None:
        try:
            # Releases are idempotent, so one whose answer the outage swallowed is safely tried again.
            ride_out(release)
        except LeaseLost as exc:
            # Our lease expired and another worker reclaimed the job; it owns the outcome now.
            logger.warning("%s", exc, extra={"worker": self.worker_id})
            return
        self.replay_releases_after_outage()
        with self._lock:
            now = time.monotonic()
            self._recent_releases.append((now, release))
            while self._recent_releases[0][0] < now - REPLAY_RELEASES_SECONDS:
                self._recent_releases.popleft()

    def replay_releases_after_outage(self) -> None:
        """After an outage, apply again the releases made just before it (see REPLAY_RELEASES_SECONDS)."""
        if availability.outages == self._outages_seen or availability.down:
            return
        with self._lock:
            if availability.outages == self._outages_seen:
                return
            self._outages_seen = availability.outages
            noticed = availability.last_outage_at or 0.0
            replay = [release for at, release in self._recent_releases if at >= noticed - REPLAY_RELEASES_SECONDS]
            self._recent_releases.clear()
        for release in replay:
            with contextlib.suppress(LeaseLost):
                ride_out(release)

    def _log(self, run: Run, outcome: str, result: Any, started: float, error: str) -> None:
        job = run.job
        logger.info(
            "run %s",
            outcome,
            extra={
                "run_id": run.pk,
                "job_id": job.pk,
                "exchange": job.connector.exchange_id,
                "symbol": job.symbol,
                "timeframe": job.timeframe,
                "worker": run.worker,
                "outcome": outcome,
                "candles_fetched": getattr(result, "candles_fetched", 0),
                "candles_written": getattr(result, "candles_written", 0),
                "requests": getattr(result, "requests", 0),
                "rate_limit_wait": getattr(result, "rate_limit_wait", 0.0),
                "duration_seconds": round(time.monotonic() - started, 4),
                "error": error,
            },
        )


class Command(BaseCommand):
    help = "Run scheduler workers: claim due collection jobs, collect them and schedule their next run."

    def add_arguments(self, parser: CommandParser) -> None:
        defaults = get_config().scheduler
        parser.add_argument("--once", action="store_true", help="Drain every job due now, then exit.")
        parser.add_argument(
            "--workers", type=int, default=defaults.workers, help=f"Worker threads (default {defaults.workers})."
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=defaults.batch_size,
            help=f"Most jobs claimed per transaction (default {defaults.batch_size}); a claim takes no more "
            "than the workers free to start them now.",
        )
        parser.add_argument(
            "--lease-seconds",
            type=float,
            default=defaults.lease_seconds,
            help=f"A claim expires this long after its last heartbeat (default {defaults.lease_seconds}).",
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=defaults.interval_seconds,
            help=f"Seconds to wait when nothing is due (default {defaults.interval_seconds}).",
        )
        parser.add_argument(
            "--worker-id",
            default=f"{socket.gethostname()}:{os.getpid()}",
            help="Name of this process in leases and runs; must be unique (default host:pid).",
        )
        parser.add_argument(
            "--collector",
            default=DEFAULT_COLLECTOR,
            help="Dotted path of the collect(job, run, heartbeat) function; for tests and benchmarks.",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=None,
            help="Serve Prometheus metrics of this process on PORT (default: off).",
        )
        parser.add_argument(
            "--metrics-address",
            default="127.0.0.1",
            help="Address the metrics port binds to (default 127.0.0.1; 0.0.0.0 for a scraper on another host).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        for name in ("workers", "batch_size"):
            if options[name] < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1, got {options[name]}")
        for name in ("lease_seconds", "interval"):
            if options[name] <= 0:
                raise CommandError(f"--{name.replace('_', '-')} must be greater than 0, got {options[name]}")
        try:
            collector = import_string(options["collector"])
        except ImportError as exc:
            raise CommandError(f"--collector {options['collector']!r} cannot be imported: {exc}") from exc
        try:
            Job.objects.exists()
        except Exception as exc:
            # Started before `migrate`: one line. Any other database error is an outage the workers ride out.
            message = missing_table_message(exc)
            if message is not None:
                raise CommandError(message) from None
        if options["metrics_port"] is not None:
            # The web exports the fleet-wide state; this process serves only its own counts.
            fleet_metrics.unregister()
            address = options["metrics_address"]
            server, _thread = start_http_server(options["metrics_port"], addr=address)
            logger.info("metrics on %s:%s", address, server.server_port, extra={"port": server.server_port})
        # Every worker opens its own connection; the main thread only supervises.
        connection.close()
        keep_worker_connections()

        config = get_config().scheduler
        self.stopping = threading.Event()
        self._install_signal_handlers()
        scheduler = Scheduler(
            options["worker_id"],
            collector,
            batch_size=options["batch_size"],
            lease_seconds=options["lease_seconds"],
            schedule_delay_seconds=config.schedule_delay_seconds,
            backoff_base_seconds=config.backoff_base_seconds,
            backoff_max_seconds=config.backoff_max_seconds,
            interval=options["interval"],
            stopping=self.stopping,
            workers=options["workers"],
        )
        threads = [
            threading.Thread(
                target=scheduler.work, args=(options["once"],), name=f"{options['worker_id']}/w{n}", daemon=True
            )
            for n in range(options["workers"])
        ]
        # The fleet registry (GET /api/v1/system/status): registered now, deregistered after the workers end.
        membership = Membership(options["worker_id"], options["workers"]).start()
        for thread in threads:
            thread.start()
        # join() with a timeout keeps the main thread responsive to signals.
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
        membership.stop()

    def _install_signal_handlers(self) -> None:
        def handle_signal(signum: int, frame: Any) -> None:
            if self.stopping.is_set():
                logger.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(128 + signum)
            logger.info(
                "%s: finishing running jobs, releasing the others",
                signal.Signals(signum).name,
                extra={"signal": signum},
            )
            self.stopping.set()

        signal.signal(signal.SIGTERM, handle_signal)
        signal.signal(signal.SIGINT, handle_signal)
