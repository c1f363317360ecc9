"""`manage.py backfill`: fetch a range of history for one exchange's symbols and timeframes, now.

Creates (or reuses) one Job per symbol and timeframe and runs the same `collect_job` the scheduler runs,
under the same shared rate limit and the same leases, so it is safe beside a running `run_scheduler`.
The job cursor is committed after every page: interrupted with Ctrl-C (or killed), a second run with
the same arguments continues where the first stopped.

A database outage is ridden out for up to `--max-outage` seconds (`collection.database_outage_seconds`):
the jobs wait and carry on from their cursors when the database is back. A longer outage stops the
backfill with its summary and a non-zero exit; its leases cannot be released without the database, so
the next backfill on this host takes over the leases of a backfill process that no longer runs.
"""

import contextlib
import functools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections, connection, connections
from django.utils.dateparse import parse_date, parse_datetime
from tqdm import tqdm

from apps.connectors import exchanges
from apps.connectors.exchanges import ExchangeError, PermanentExchangeError, get_client
from apps.connectors.models import Connector, Market
from apps.jobs.collect import CollectionFailed, CollectResult, collect_job
from apps.jobs.models import Job, LeaseLost, backfill_owner, validate_symbol, validate_timeframe
from apps.jobs.outages import (
    STALE_CONNECTION_RETRIES,
    DatabaseUnavailable,
    database_answers,
    is_database_error,
    ride_out,
    wait_for_database,
)
from apps.marketdata import store
from apps.marketdata.timeframes import datetime_to_ms, ms_to_datetime, timeframe_ms
from apps.monitoring import live
from datacollector.config import get_config

T = TypeVar("T")

# Passes over one job when the end of the range stayed empty or the exchange kept failing (collect_one).
MAX_PASSES = 3
# Default pages each job requests ahead of the one being written (collect._Fetcher), each from its own
# helper thread and database connection. One request at a time cannot use a budget: at 20 ms per
# request a series makes at most ~37 requests a second, and the last series of a backfill runs alone.
PREFETCH_PAGES = 2

DATE_HELP = "ISO 8601 date or datetime in UTC (2024-01-01, 2024-01-01T12:00, 2024-01-01T12:00:00+02:00) or epoch ms"


def parse_when(value: str, option: str) -> int:
    """A command-line date as UTC epoch milliseconds, or a CommandError naming the option."""
    text = value.strip()
    if text.isdigit():
        ms = int(text)
        if ms < 10**11:
            raise CommandError(
                f"{option} {value!r} looks like epoch seconds or a year; give epoch milliseconds "
                f"(e.g. {ms * 1000}) or a date. Accepted: {DATE_HELP}."
            )
        return ms
    try:
        moment = parse_datetime(text.replace(" ", "T", 1)) if "T" in text or " " in text else None
        day = None if moment else parse_date(text)
    except ValueError:
        moment = day = None
    if moment is None and day is None:
        raise CommandError(f"{option} {value!r} is not a date. Accepted: {DATE_HELP}.")
    if day is not None:
        moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return datetime_to_ms(moment)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Command(BaseCommand):
    help = "Fetch history for symbols and timeframes of one exchange now, resumably, through the shared rate limit."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--exchange", required=True, help="Exchange id of a configured connector (e.g. binance).")
        parser.add_argument("--symbol", required=True, help="ccxt symbol(s), comma-separated: BTC/USDT,ETH/USDT.")
        parser.add_argument("--timeframe", required=True, help="Timeframe(s), comma-separated: 1m,1h,1d.")
        parser.add_argument("--since", required=True, help=f"Start of the history to fetch: {DATE_HELP}.")
        parser.add_argument(
            "--until", help=f"End (exclusive) of the history to fetch; default: the last closed candle. {DATE_HELP}."
        )
        parser.add_argument(
            "--workers", type=int, default=1, help="Jobs collected concurrently by each process (threads)."
        )
        parser.add_argument(
            "--processes",
            type=int,
            default=1,
            help="Processes sharing the jobs, each taking whole series as it becomes free (one Python process "
            "uses one core). Default 1.",
        )
        parser.add_argument(
            "--prefetch",
            type=int,
            default=PREFETCH_PAGES,
            help="Pages each job requests ahead while it writes the current one (a thread and a database "
            f"connection each; 0: one request at a time). Default {PREFETCH_PAGES}.",
        )
        parser.add_argument(
            "--lease-seconds",
            type=float,
            default=None,
            help="Lease held on each job while it is collected (default: scheduler.lease_seconds).",
        )
        parser.add_argument(
            "--max-outage",
            type=float,
            default=None,
            help="Seconds a database outage is waited out before the backfill stops with its summary "
            "(default: collection.database_outage_seconds).",
        )

    def handle(self, *args, **options) -> None:
        self.stopping = threading.Event()
        self.gave_up_on_database = threading.Event()
        max_outage = options["max_outage"]
        if max_outage is not None and max_outage < 0:
            raise CommandError(f"--max-outage must be 0 or more, got {max_outage:g}.")
        self.max_outage = get_config().collection.database_outage_seconds if max_outage is None else max_outage
        try:
            connector, symbols, timeframes, since_ms, until_ms = self.ride_out(lambda: self.validate(options))
            workers = options["workers"]
            self.prefetch = options["prefetch"]
            lease_seconds = options["lease_seconds"] or get_config().scheduler.lease_seconds
            jobs = self.ride_out(lambda: self.prepare_jobs(connector, symbols, timeframes, since_ms))

            self.install_signal_handlers()
            total = self.ride_out(lambda: sum(self.expected_slots(job, since_ms, until_ms) for job in jobs))
        except DatabaseUnavailable as exc:
            raise CommandError(f"{exc}; nothing was collected. Run the same command again once it is back.") from None
        started = time.monotonic()
        if options["processes"] > 1:
            # Started before the progress bar, whose monitor thread a fork should not copy.
            events = self.start_processes(jobs, options["processes"], workers, lease_seconds, until_ms)
        bar = tqdm(
            total=total,
            unit=" candles",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=options["verbosity"] == 0,
            desc=f"{connector.exchange_id} backfill",
        )
        lock = threading.Lock()

        def progress(slots: int, _written: int) -> None:
            with lock:
                bar.update(slots)

        if options["processes"] > 1:
            outcomes = self.gather(jobs, events, progress)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backfill") as pool:
                futures = [
                    pool.submit(self.collect_one, job, backfill_owner(index), lease_seconds, until_ms, progress)
                    for index, job in enumerate(jobs)
                ]
                outcomes = [future.result() for future in futures]
        bar.close()
        self.report(outcomes, time.monotonic() - started)

    # --- Several processes ------------------------------------------------------------------------------

    def start_processes(
        self, jobs: list[Job], processes: int, workers: int, lease_seconds: float, until_ms: int | None
    ) -> Any:
        """Fork `processes` children that share `jobs` through a queue; returns the queue of their events.

        Each child runs `workers` threads, each taking the next whole series; the leases they take are the
        same as in one process, so the children, a scheduler and other backfills never collect one series
        at once, and the shared rate limit keeps them all within the exchange's budget together.
        """
        context = multiprocessing.get_context("fork")
        todo, events = context.Queue(), context.Queue()
        for index in range(len(jobs)):
            todo.put(index)
        # Nothing a child could share by accident: database connections and ccxt sessions are made anew.
        connections.close_all()
        exchanges.clear_clients()
        self.children = []
        for _ in range(processes):
            child = context.Process(
                target=self.child, args=(jobs, todo, events, workers, lease_seconds, until_ms), daemon=False
            )
            child.start()
            self.children.append(child)
        return events

    def child(self, jobs: list[Job], todo: Any, events: Any, workers: int, lease_seconds: float, until_ms) -> None:
        """A child process: collect series from `todo` until none is left, reporting to `events`."""
        self.children = []  # the signal handler (inherited) forwards signals only from the parent

        def progress(slots: int, _written: int) -> None:
            events.put(("progress", slots))

        def take() -> None:
            while not self.stopping.is_set():
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                _job, result, outcome = self.collect_one(
                    jobs[index], backfill_owner(index), lease_seconds, until_ms, progress
                )
                events.put(("done", index, result, outcome))

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backfill") as pool:
            for future in [pool.submit(take) for _ in range(workers)]:
                future.result()
        events.put(("exit", self.gave_up_on_database.is_set()))
        events.close()
        events.join_thread()

    def gather(self, jobs: list[Job], events: Any, progress: Callable[[int, int], None]) -> list:
        """The parent's part: show the children's progress, collect their outcomes, wait for them."""
        outcomes: dict[int, tuple[Job, CollectResult | None, str]] = {}
        exited = 0
        while exited < len(self.children):
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if not any(child.is_alive() for child in self.children):
                    break  # a child killed before saying goodbye
                continue
            if event[0] == "progress":
                progress(event[1], 0)
            elif event[0] == "done":
                _, index, result, outcome = event
                outcomes[index] = (jobs[index], result, outcome)
            else:
                exited += 1
                if event[1]:
                    self.gave_up_on_database.set()
        for child in self.children:
            child.join()
        for job in jobs:
            with contextlib.suppress(Exception):
                self.ride_out(job.refresh_from_db)
        return [outcomes.get(index, (job, None, "not started")) for index, job in enumerate(jobs)]

    def ride_out(self, step: Callable[[], T]) -> T:
        """Run a database step through an outage of up to --max-outage seconds (DatabaseUnavailable after)."""
        return ride_out(step, give_up_after=self.max_outage)

    # --- Validation: everything is checked before anything is fetched ----------------------------------

    def validate(self, options: dict) -> tuple[Connector, list[str], list[str], int, int | None]:
        exchange_id = options["exchange"].strip()
        try:
            connector = Connector.objects.for_exchange(exchange_id)
        except ValidationError as exc:
            raise CommandError(f"--exchange: {exc.messages[0]}") from None
        if not connector.enabled:
            raise CommandError(
                f"--exchange: the {exchange_id} connector is disabled; enable it (admin or API) before a backfill."
            )
        if options["workers"] < 1:
            raise CommandError(f"--workers must be at least 1, got {options['workers']}.")
        if options["processes"] < 1:
            raise CommandError(f"--processes must be at least 1, got {options['processes']}.")
        if options["prefetch"] < 0:
            raise CommandError(f"--prefetch must be 0 or more, got {options['prefetch']}.")

        since_ms = parse_when(options["since"], "--since")
        until_ms = parse_when(options["until"], "--until") if options["until"] else None
        now_ms = int(time.time() * 1000)
        if since_ms >= now_ms:
            raise CommandError(f"--since {options['since']!r} is in the future: there is no history there yet.")
        if until_ms is not None and until_ms <= since_ms:
            raise CommandError(f"--until {options['until']!r} must be after --since {options['since']!r}.")

        symbols, timeframes = _split(options["symbol"]), _split(options["timeframe"])
        if not symbols:
            raise CommandError("--symbol: give at least one symbol, e.g. BTC/USDT or BTC/USDT,ETH/USDT.")
        if not timeframes:
            raise CommandError("--timeframe: give at least one timeframe, e.g. 1m or 1m,1h.")
        for timeframe in timeframes:
            try:
                validate_timeframe(timeframe, exchange_id)
            except ValidationError as exc:
                raise CommandError(f"--timeframe: {exc.messages[0]}") from None
        for symbol in symbols:
            try:
                validate_symbol(symbol)
            except ValidationError as exc:
                raise CommandError(f"--symbol: {exc.messages[0]}") from None
        listing = Market.objects.listing_errors(exchange_id, symbols)
        if listing:
            raise CommandError(f"--symbol: {' '.join(listing.values())}")

        # The exchange has the last word on symbols and timeframes (one markets request).
        try:
            client = get_client(connector)
        except ExchangeError as exc:
            raise CommandError(f"--exchange: the {exchange_id} connector cannot be used: {exc}") from None
        try:
            markets = set(client.markets())
            offered = client.timeframes()
        except ExchangeError as exc:
            raise CommandError(f"--exchange: could not load the markets of {exchange_id}: {exc}") from None
        unknown = [symbol for symbol in symbols if symbol not in markets]
        if unknown:
            examples = ", ".join(sorted(markets)[:8])
            raise CommandError(
                f"--symbol: {', '.join(unknown)} not listed by {exchange_id} ({len(markets)} markets, e.g. {examples})."
            )
        not_offered = [timeframe for timeframe in timeframes if offered and timeframe not in offered]
        if not_offered:
            raise CommandError(
                f"--timeframe: {', '.join(not_offered)} not offered by {exchange_id}; it offers: {', '.join(offered)}."
            )
        return connector, symbols, timeframes, since_ms, until_ms

    # --- Jobs -----------------------------------------------------------------------------------------

    def prepare_jobs(self, connector: Connector, symbols: list[str], timeframes: list[str], since_ms: int) -> list[Job]:
        since = ms_to_datetime(since_ms)
        jobs = []
        for symbol in symbols:
            for timeframe in timeframes:
                job, created = Job.objects.get_or_create(
                    connector=connector, symbol=symbol, timeframe=timeframe, defaults={"since": since}
                )
                if not created and (job.since is None or since < job.since):
                    # Earlier history than the job held: collection fills the head before the cursor.
                    Job.objects.filter(pk=job.pk).update(since=since)
                    job.since = since
                action = "created" if created else f"reused (cursor {self.format_ms(job.cursor)})"
                self.stdout.write(f"{connector.exchange_id} {symbol} {timeframe}: job {job.pk} {action}")
                jobs.append(job)
        return jobs

    def expected_slots(self, job: Job, since_ms: int, until_ms: int | None) -> int:
        """Candles still to fetch for the progress bar's total (an estimate: holes and listing dates)."""
        step = timeframe_ms(job.timeframe)
        end = min(until_ms or int(time.time() * 1000), int(time.time() * 1000))
        first = store.first_ts(job.exchange_id, job.symbol, job.timeframe)
        slots = 0
        if job.cursor is not None and first is not None and since_ms < first:
            slots += max(0, (min(first, end) - since_ms) // step)
        start = job.cursor + step if job.cursor is not None else since_ms
        return slots + max(0, (end - start) // step)

    def collect_one(
        self, job: Job, worker: str, lease_seconds: float, until_ms: int | None, progress
    ) -> tuple[Job, CollectResult | None, str]:
        """One job in a worker thread, with its own database connection; returns (job, result, outcome)."""
        close_old_connections()
        result: CollectResult | None = None
        try:
            if self.stopping.is_set():
                return job, None, "not started"
            run = self.ride_out(lambda: Job.objects.claim_for_backfill(job, worker, lease_seconds))
            if run is None:
                self.ride_out(job.refresh_from_db)
                until = f" until {job.lease_expires_at:%H:%M:%S} UTC" if job.lease_expires_at else ""
                return job, None, f"skipped: being collected by {job.lease_owner or 'another worker'}{until}"
            config = get_config().scheduler
            result = CollectResult()
            heartbeat = run.heartbeat(lease_seconds)
            passes = stale = 0
            progress = live.backfill_progress(job, progress)  # also the hub's `jobs` channel, once a second
            while True:
                cursor = job.cursor
                try:
                    result = result + collect_job(
                        job,
                        run,
                        heartbeat,
                        until_ms=until_ms,
                        progress=progress,
                        stop=self.stopping,
                        max_pages=None,
                        prefetch=self.prefetch,
                    )
                except CollectionFailed as failed:
                    result, exc = result + failed.result, failed.error
                    if isinstance(exc, LeaseLost):
                        # The lease expired (this process stalled) and a scheduler worker took the job over.
                        return job, result, f"failed: {exc}"
                    if isinstance(exc, PermanentExchangeError):
                        self.finish(functools.partial(run.fail_permanently, str(exc), result))
                        return job, result, f"failed: {exc}"
                    if is_database_error(exc):
                        # Not the exchange's fault and not a pass: once the database answers, the job goes
                        # on from its committed cursor (a commit whose answer was lost moved it on).
                        # Errors while a fresh connection answers come from connections the outage broke;
                        # a few are expected, more are a real error of the database's, handled below.
                        stale = stale + 1 if database_answers() else 0
                        if stale <= STALE_CONNECTION_RETRIES:
                            wait_for_database(give_up_after=self.max_outage)
                            self.ride_out(lambda: job.refresh_from_db(fields=["cursor", "since"]))
                            continue
                    passes += 1
                    retry_after = getattr(exc, "retry_after", None)
                    if passes < MAX_PASSES and isinstance(exc, ExchangeError) and not self.stopping.is_set():
                        # The client's own retries are spent; the pages so far are saved. Pause, then go on.
                        pause = min(max(retry_after or 0.0, 1.0), 60.0)
                        self.stderr.write(f"{job}: {exc}; continuing in {pause:.0f}s")
                        self.stopping.wait(pause)
                        continue
                    backoff = config.backoff_base_seconds, config.backoff_max_seconds
                    self.finish(functools.partial(run.fail, str(exc), *backoff, retry_after, result))
                    return job, result, f"failed: {exc}"
                passes += 1
                # Pages at the end of the range that stayed empty are asked for again while that helps;
                # a pass that gets no further (a delisted market) ends it.
                if result.complete or result.stopped or job.cursor == cursor or passes >= MAX_PASSES:
                    break
            self.finish(functools.partial(run.succeed, result, config.schedule_delay_seconds))
            self.ride_out(job.refresh_from_db)
            live.publish_backfill(job, result.candles_written, done=True)
            return job, result, "stopped" if result.stopped else "done"
        except DatabaseUnavailable as exc:
            # The run stays open and the job leased: neither can change without the database.
            self.gave_up_on_database.set()
            return job, result, f"failed: {exc}"
        finally:
            connection.close()

    def finish(self, release: Callable[[], object]) -> None:
        """Release the job with its outcome, through an outage; a lease lost meanwhile is the new owner's."""
        with contextlib.suppress(LeaseLost):
            self.ride_out(release)

    # --- Signals and output -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: object) -> None:
            if self.stopping.is_set():
                self.stderr.write("\nSecond signal: exiting now (cursors are saved up to the last whole page).")
                os._exit(130)
            self.stopping.set()
            for child in getattr(self, "children", ()):
                # A signal sent to this process alone (not to its group, as Ctrl-C is) reaches the children too.
                with contextlib.suppress(OSError):
                    os.kill(child.pid, signum)
            self.stderr.write("\nStopping after the current page of each job; run the same command again to resume.")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    @staticmethod
    def format_ms(ms: int | None) -> str:
        return "none" if ms is None else ms_to_datetime(ms).strftime("%Y-%m-%d %H:%M UTC")

    def report(self, outcomes: list[tuple[Job, CollectResult | None, str]], elapsed: float) -> None:
        written = requests = rate_limited = gaps = 0
        wait = 0.0
        failures = []
        for job, result, outcome in outcomes:
            if result is not None:
                written += result.candles_written
                requests += result.requests
                wait += result.rate_limit_wait
                rate_limited += result.rate_limited
                gaps += result.gaps_open
            detail = (
                f"{result.candles_written} written, {result.requests} requests, {result.gaps_open} open gaps, "
                if result is not None
                else ""
            )
            self.stdout.write(f"  {job.symbol} {job.timeframe}: {outcome}; {detail}cursor {self.format_ms(job.cursor)}")
            if outcome.startswith("failed") or outcome.startswith("skipped"):
                failures.append(f"{job.symbol} {job.timeframe}")
        rate = written / elapsed if elapsed > 0 else 0.0
        self.stdout.write(
            f"Backfill: {written} candles written in {elapsed:.1f}s ({rate:,.0f}/s), {requests} requests, "
            f"{wait:.1f}s waiting for the rate limit, {rate_limited} rate-limit answers (429/418), "
            f"{gaps} open gaps."
        )
        if self.stopping.is_set():
            self.stdout.write("Interrupted: run the same command again to continue from the saved cursors.")
        if self.gave_up_on_database.is_set():
            self.stdout.write(
                f"Stopped: the database was unavailable longer than {self.max_outage:g} s (--max-outage). "
                "Cursors are saved up to the last page stored; run the same command again once it is back: "
                "it takes over this backfill's leases at once."
            )
        if failures:
            raise CommandError(f"{len(failures)} job(s) did not complete: {', '.join(failures)} (see above).")
