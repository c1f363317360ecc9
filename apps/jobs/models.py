import os
import random
import re
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connections, models, transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Least
from django.utils import timezone

from apps.connectors.exchanges import is_known_exchange, offline_timeframes
from apps.connectors.models import Connector, Market
from apps.marketdata.timeframes import is_valid_timeframe, next_candle_close, timeframe_error
from apps.monitoring import live
from datacollector.config import get_config

# ccxt unified symbols: BASE/QUOTE for spot, BASE/QUOTE:SETTLE for derivatives, optionally followed by
# the expiry/strike/type of futures and options (BTC/USDT:USDT-250328). Codes are opaque to us (1000PEPE,
# USDC.E), so only the separators are checked.
_SYMBOL_RE = re.compile(r"^[^\s/:]+/[^\s/:]+(:[^\s/:]+)?$")

# Fields naming the series; the cursor and the stored candles belong to them, so they never change.
SERIES_FIELDS = ("connector", "symbol", "timeframe")


def validate_symbol(value: str) -> None:
    if not _SYMBOL_RE.match(value):
        raise ValidationError(
            f"Symbol {value!r} is not a ccxt unified symbol: use BASE/QUOTE (e.g. BTC/USDT), "
            "or BASE/QUOTE:SETTLE for derivatives (e.g. BTC/USDT:USDT).",
            code="bad_symbol",
        )


def validate_timeframe(timeframe: str, exchange_id: str) -> None:
    """Accept what the exchange offers; when ccxt knows nothing offline, any well-formed timeframe."""
    offered = offline_timeframes(exchange_id) if is_known_exchange(exchange_id) else ()
    if offered:
        if timeframe not in offered:
            raise ValidationError(
                f"Timeframe {timeframe!r} is not offered by {exchange_id}; it offers: {', '.join(offered)}.",
                code="bad_timeframe",
            )
    elif not is_valid_timeframe(timeframe):
        raise ValidationError(timeframe_error(timeframe), code="bad_timeframe")


# First part of a backfill's lease owners (`backfill_owner`).
BACKFILL_OWNER_PREFIX = "backfill"


class LeaseLost(Exception):
    """The worker's claim on a job was taken over (its lease expired and another worker reclaimed it)."""

    def __init__(self, job_id: int, worker: str) -> None:
        super().__init__(
            f"job {job_id}: lease of worker {worker!r} was lost (it expired and the job was reclaimed); "
            "stop working on it, the new owner records the outcome"
        )
        self.job_id = job_id
        self.worker = worker


# The job's fields a release may change that its reporters show (`Run._release` sets them on `run.job`).
_RELEASED_FIELDS = ("status", "cursor", "next_run_at", "last_error", "consecutive_failures")


def _can_release_in_one_statement(using: str) -> bool:
    """PostgreSQL runs a release as one statement (data-modifying CTEs); others use a transaction."""
    return connections[using].vendor == "postgresql"


def backoff_seconds(failures: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with equal jitter: between half and all of min(cap, base * 2**(failures-1)).

    Equal rather than full jitter: a failing job never comes back sooner than half its backoff, so
    a fleet of broken jobs cannot hot-loop the workers, while the jitter still spreads them out.
    """
    ceiling = min(cap, base * 2 ** max(0, min(failures - 1, 62)))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def backfill_owner(index: int) -> str:
    """The lease owner of a backfill's `index`-th job: "backfill:<host>:<pid>:<index>"."""
    return f"{BACKFILL_OWNER_PREFIX}:{socket.gethostname()}:{os.getpid()}:{index}"


def left_by_dead_backfill(owner: str) -> bool:
    """Whether the lease owner `owner` is a backfill process of this host that no longer runs.

    Such a lease is safe to take over at once: its holder is gone for sure (a backfill that stopped on
    a database outage could not release its leases). Anything else (another host's backfill, a
    scheduler, a pid now used by a live process, this very process) is left to its lease.
    """
    parts = owner.split(":")
    if len(parts) != 4 or parts[0] != BACKFILL_OWNER_PREFIX or parts[1] != socket.gethostname():
        return False
    try:
        pid = int(parts[2])
    except ValueError:
        return False
    return pid != os.getpid() and not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # A zombie has exited; only its parent has not collected its exit status yet.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class JobQuerySet(models.QuerySet):
    def due(self, now: datetime | None = None) -> "JobQuerySet":
        """Active jobs of enabled connectors whose time has come and that no live worker holds."""
        now = now or timezone.now()
        return self.filter(
            Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now),
            status=Job.Status.ACTIVE,
            connector__enabled=True,
            next_run_at__lte=now,
        )

    def claim(self, worker: str, limit: int, lease_seconds: float, now: datetime | None = None) -> list["Run"]:
        """Lease up to `limit` due jobs to `worker`, oldest first; returns their new running Runs.

        One short transaction: lock, lease, close runs orphaned by an expired lease, create the
        Runs, commit. Nothing else happens under the row locks. Two workers never win the same job:
        PostgreSQL skips rows another claim has locked; elsewhere a compare-and-set UPDATE decides.
        """
        now = now or timezone.now()
        lease = {"lease_owner": worker, "lease_expires_at": now + timedelta(seconds=lease_seconds)}
        if connections[self.db].vendor == "postgresql" and not connections[self.db].in_atomic_block:
            return self._claim_in_one_statement(worker, limit, now, lease["lease_expires_at"])
        with transaction.atomic(using=self.db):
            if connections[self.db].features.has_select_for_update_skip_locked:
                jobs = list(
                    self.due(now)
                    .select_for_update(skip_locked=True, of=("self",))
                    .select_related("connector")
                    .order_by("next_run_at")[:limit]
                )
                if not jobs:
                    return []
                self.model.objects.filter(pk__in=[job.pk for job in jobs]).update(**lease, last_run_at=now)
            else:
                # No SKIP LOCKED (SQLite): read candidates unlocked, then keep only those our guarded
                # UPDATE still finds due, so a job a concurrent claim took in between is lost, not shared.
                candidates = list(self.due(now).select_related("connector").order_by("next_run_at")[:limit])
                jobs = [
                    job
                    for job in candidates
                    if self.model.objects.due(now).filter(pk=job.pk).update(**lease, last_run_at=now)
                ]
                if not jobs:
                    return []
            # A running Run can only exist while its job holds a lease (every release clears both at
            # once), so only jobs whose lease expired can have one to close.
            expired = [job.pk for job in jobs if job.lease_expires_at is not None]
            if expired:
                Run.objects.filter(job_id__in=expired).close_abandoned(now)
            for job in jobs:
                job.lease_owner, job.lease_expires_at, job.last_run_at = worker, lease["lease_expires_at"], now
            return Run.objects.bulk_create([Run(job=job, worker=worker, started_at=now) for job in jobs])

    def _claim_in_one_statement(self, worker: str, limit: int, now: datetime, expires: datetime) -> list["Run"]:
        """`claim` on PostgreSQL as one statement (its own transaction): lock, lease, close the runs of
        expired leases, create the Runs. One round trip instead of five, at every minute's burst of claims;
        the claimed jobs are then read with their connectors, outside any lock."""
        due = self.due(now).order_by("next_run_at").values("id")[:limit]
        due_sql, due_params = due.query.sql_with_params()
        sql = f"""
            WITH picked AS (
                {due_sql} FOR UPDATE OF "jobs_job" SKIP LOCKED
            ), leased AS (
                UPDATE jobs_job AS job
                SET lease_owner = %s, lease_expires_at = %s, last_run_at = %s
                FROM picked WHERE job.id = picked.id
                RETURNING job.id
            ), closed AS (
                UPDATE jobs_run SET status = %s, finished_at = %s, error = %s
                WHERE status = %s AND job_id IN (SELECT id FROM picked)
            )
            INSERT INTO jobs_run
                (job_id, status, worker, started_at, finished_at, candles_fetched, candles_written, requests,
                 rate_limit_wait, error)
            SELECT id, %s, %s, %s, NULL, 0, 0, 0, 0, '' FROM leased
            RETURNING id, job_id
        """
        # Runs still running on a picked job belong to an expired lease (every release clears both at
        # once): `closed` fails them as RunQuerySet.close_abandoned does. It sees the snapshot the statement
        # started with, so never the Runs this statement inserts.
        running, failed = Run.Status.RUNNING, Run.Status.FAILED
        params = (
            *due_params,
            *(worker, expires, now),
            *(failed, now, Run.LEASE_EXPIRED, running),
            *(running, worker, now),
        )
        with connections[self.db].cursor() as cursor:
            cursor.execute(sql, params)
            claimed = dict((job_id, run_id) for run_id, job_id in cursor.fetchall())
        if not claimed:
            return []
        jobs = (
            self.model.objects.using(self.db).select_related("connector").filter(pk__in=claimed).order_by("next_run_at")
        )
        runs = []
        for job in jobs:
            run = Run(id=claimed[job.pk], job=job, worker=worker, started_at=now)
            run._state.adding, run._state.db = False, self.db
            runs.append(run)
        return runs

    def claim_for_backfill(
        self, job: "Job", worker: str, lease_seconds: float, now: datetime | None = None
    ) -> "Run | None":
        """Lease `job` to a backfill worker and open its Run, unless a live worker holds it (then None).

        The same lease the scheduler uses, so a running `run_scheduler` leaves the job alone meanwhile;
        the job's status and schedule are not consulted: the operator asked for this collection. A lease
        left by a dead backfill of this host is taken over at once. Claiming again with the same `worker`
        returns the Run already open (an attempt whose answer a database outage swallowed).
        """
        now = now or timezone.now()
        expires = now + timedelta(seconds=lease_seconds)
        free = Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now) | Q(lease_owner=worker)
        holder = self.filter(pk=job.pk).values_list("lease_owner", flat=True).first()
        if holder and left_by_dead_backfill(holder):
            # Guarded by the owner read: if anyone claimed the job since, the UPDATE below finds nothing.
            free |= Q(lease_owner=holder)
        with transaction.atomic(using=self.db):
            if not self.filter(free, pk=job.pk).update(lease_owner=worker, lease_expires_at=expires, last_run_at=now):
                return None
            job.lease_owner, job.lease_expires_at, job.last_run_at = worker, expires, now
            ours = Run.objects.filter(job=job, worker=worker, status=Run.Status.RUNNING).first()
            if ours is not None:
                return ours
            # A run left open by a worker whose lease expired (or a dead backfill), as a scheduler claim does.
            Run.objects.filter(job=job).close_abandoned(now)
            return Run.objects.create(job=job, worker=worker, started_at=now)

    def pause(self) -> int:
        return self._operate(status=Job.Status.PAUSED, updated_at=timezone.now())

    def resume(self) -> int:
        """Activate, clear the error state, and run at once if the next run was further away."""
        now = timezone.now()
        return self._operate(
            status=Job.Status.ACTIVE,
            last_error="",
            consecutive_failures=0,
            next_run_at=Least(F("next_run_at"), Value(now)),
            updated_at=now,
        )

    def run_now(self) -> int:
        now = timezone.now()
        return self._operate(
            status=Job.Status.ACTIVE, last_error="", consecutive_failures=0, next_run_at=now, updated_at=now
        )

    def stop(self, reason: str) -> int:
        """Put the jobs in error with `reason` (their market went away): they wait to be resumed."""
        return self._operate(status=Job.Status.ERROR, last_error=reason, updated_at=timezone.now())

    def _operate(self, **changes: Any) -> int:
        """A change made outside a run (an operator's in the admin or API, a markets refresh): update, and
        once it commits the live hub shows the jobs' new state (`jobs` channel)."""
        pks = list(self.values_list("pk", flat=True))
        if not pks:
            return 0
        changed = self.model.objects.using(self.db).filter(pk__in=pks).update(**changes)
        jobs = self.model.objects.using(self.db).filter(pk__in=pks).select_related("connector")
        transaction.on_commit(lambda: live.jobs_changed(jobs), using=self.db)
        return changed


class Job(models.Model):
    """Keep one series (exchange, symbol, timeframe) collected up to its last closed candle."""

    class Status(models.TextChoices):
        ACTIVE = "active"
        PAUSED = "paused"
        ERROR = "error"

    connector = models.ForeignKey(Connector, on_delete=models.CASCADE, related_name="jobs")
    symbol = models.CharField(max_length=64, help_text="ccxt unified symbol, BASE/QUOTE, e.g. BTC/USDT.")
    timeframe = models.CharField(max_length=8, help_text="A timeframe the exchange offers, e.g. 1m, 1h, 1d.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    since = models.DateTimeField(
        null=True, blank=True, help_text="Start of history to collect (UTC). Blank: a recent window."
    )
    cursor = models.BigIntegerField(
        null=True, blank=True, help_text="Open time (UTC ms) of the last stored candle; collection resumes after it."
    )
    next_run_at = models.DateTimeField(default=timezone.now)
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["connector__exchange_id", "symbol", "timeframe"]
        constraints = [
            models.UniqueConstraint(fields=["connector", "symbol", "timeframe"], name="job_unique_series"),
        ]
        indexes = [models.Index(fields=["status", "next_run_at"], name="job_due_idx")]

    def __str__(self) -> str:
        return f"{self.connector.exchange_id} {self.symbol} {self.timeframe}"

    def clean(self) -> None:
        # The rules the API and the admin share: both call full_clean(), so they report the same errors.
        errors: dict[str, str] = {}
        if self.symbol:
            try:
                validate_symbol(self.symbol)
            except ValidationError as exc:
                errors["symbol"] = exc.messages[0]
        if self.pk is None and self.symbol and "symbol" not in errors and self.connector_id is not None:
            # New jobs only: a job whose market was delisted since stays editable (its status says so).
            listing = Market.objects.listing_errors(self.connector.exchange_id, [self.symbol])
            if listing:
                errors["symbol"] = listing[self.symbol]
        if self.timeframe and self.connector_id is not None:
            try:
                validate_timeframe(self.timeframe, self.connector.exchange_id)
            except ValidationError as exc:
                errors["timeframe"] = exc.messages[0]
        if self.since is not None and self.since > timezone.now():
            errors["since"] = "since must not be in the future: it is where the history to collect starts."
        if self.pk is not None:
            original = Job.objects.filter(pk=self.pk).values("connector", "symbol", "timeframe").first()
            for field in SERIES_FIELDS if original else ():
                current = self.connector_id if field == "connector" else getattr(self, field)
                if current != original[field]:
                    errors[field] = (
                        f"{field} cannot be changed after creation: the cursor and the stored candles belong to "
                        "the series (exchange, symbol, timeframe); create another job instead."
                    )
        if errors:
            raise ValidationError(errors)

    def unique_error_message(self, model_class: type[models.Model], unique_check: tuple[str, ...]) -> ValidationError:
        if model_class is Job and set(unique_check) == set(SERIES_FIELDS):
            return ValidationError(
                f"A job for {self.connector.exchange_id} {self.symbol} {self.timeframe} already exists.",
                code="unique_together",
            )
        return super().unique_error_message(model_class, unique_check)

    @property
    def exchange_id(self) -> str:
        return self.connector.exchange_id

    def pause(self) -> None:
        Job.objects.filter(pk=self.pk).pause()
        self.refresh_from_db()

    def resume(self) -> None:
        Job.objects.filter(pk=self.pk).resume()
        self.refresh_from_db()

    def run_now(self) -> None:
        Job.objects.filter(pk=self.pk).run_now()
        self.refresh_from_db()

    def next_run_after_success(self, now: datetime, delay_seconds: float) -> datetime:
        """When the next candle has closed, plus a delay for the exchange to publish it."""
        return next_candle_close(self.timeframe, now) + timedelta(seconds=delay_seconds)


class RunQuerySet(models.QuerySet):
    def close_abandoned(self, now: datetime | None = None) -> int:
        """Fail the running Runs among these as "lease expired": their worker's lease is gone, so that
        worker can no longer release them. The one way such a Run is closed, by a claim taking its job
        over (scheduler or backfill) or by `close_orphaned`."""
        now = now or timezone.now()
        return self.filter(status=Run.Status.RUNNING).update(
            status=Run.Status.FAILED, finished_at=now, error=Run.LEASE_EXPIRED
        )

    def close_orphaned(self, now: datetime | None = None) -> int:
        """Fail running Runs that no claim will ever close: their job's lease was cleared by hand, or
        it expired while the job is paused, in error or its connector disabled (claimable jobs have
        theirs closed when they are reclaimed)."""
        now = now or timezone.now()
        unclaimable = ~Q(job__status=Job.Status.ACTIVE) | Q(job__connector__enabled=False)
        return self.filter(
            Q(job__lease_expires_at__isnull=True) | (Q(job__lease_expires_at__lt=now) & unclaimable)
        ).close_abandoned(now)

    def held_by(self, worker: str) -> list["Run"]:
        """The running Runs of claim `worker` whose jobs it still holds: what a claim whose answer was
        lost (the connection dropped after its commit) took, so the claimer can carry on with them."""
        return list(
            self.filter(worker=worker, status=Run.Status.RUNNING, job__lease_owner=worker).select_related(
                "job__connector"
            )
        )


class Run(models.Model):
    """One attempt at collecting a job, recorded whatever its outcome."""

    LEASE_EXPIRED = "lease expired"

    class Status(models.TextChoices):
        RUNNING = "running"
        SUCCESS = "success"
        FAILED = "failed"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    worker = models.CharField(max_length=200)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    candles_fetched = models.PositiveIntegerField(default=0)
    candles_written = models.PositiveIntegerField(default=0)
    requests = models.PositiveIntegerField(default=0)
    rate_limit_wait = models.FloatField(default=0.0, help_text="Seconds spent waiting for the shared rate limit.")
    error = models.TextField(blank=True)

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["job", "-started_at"], name="run_job_history_idx"),
            models.Index(fields=["status", "started_at"], name="run_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.job} {self.status} at {self.started_at:%Y-%m-%d %H:%M:%S}"

    @property
    def duration(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def _owned_job(self) -> models.QuerySet:
        # Run.worker is the claim's lease owner, unique per claim ("<worker id>/<claim number>"), so it
        # identifies this claim; a reclaim, even by the same process, replaces it.
        return Job.objects.filter(pk=self.job_id, lease_owner=self.worker)

    def renew_lease(self, lease_seconds: float) -> None:
        """Push the lease forward (one guarded UPDATE); raises LeaseLost if another worker took the job."""
        now = timezone.now()
        if not self._owned_job().update(lease_expires_at=now + timedelta(seconds=lease_seconds)):
            raise LeaseLost(self.job_id, self.worker)

    def begin(self, lease_seconds: float, fresh_seconds: float = 1.0) -> None:
        """Mark the actual start of a job that waited behind others of its batch: renew its lease
        (LeaseLost if it was reclaimed meanwhile) and restamp started_at. A claim younger than
        `fresh_seconds` needs neither, which saves two writes per job in the common case."""
        now = timezone.now()
        if (now - self.started_at).total_seconds() < fresh_seconds:
            return
        with transaction.atomic():
            self.renew_lease(lease_seconds)
            Run.objects.filter(pk=self.pk).update(started_at=now)
        self.started_at = now

    def heartbeat(self, lease_seconds: float, every: float | None = None) -> Callable[[], None]:
        """The callable a collector calls as it goes (each page); renews at most every `every` seconds
        (default a quarter of the lease), so calling it often costs nothing."""
        every = lease_seconds / 4 if every is None else every
        last = timezone.now()

        def beat() -> None:
            nonlocal last
            now = timezone.now()
            if (now - last).total_seconds() >= every:
                self.renew_lease(lease_seconds)
                last = now

        return beat

    def _release(
        self,
        status: str,
        *,
        result: object = None,
        error: str = "",
        next_run_at: datetime | None = None,
        job_status: str | None = None,
    ) -> None:
        """Close this Run and clear the job's lease atomically; LeaseLost if the job is no longer ours.

        A failure (status failed) counts against the job and sets its last_error; a success resets both.
        `next_run_at` and `job_status`, when given, are the job's new values.
        """
        now = timezone.now()
        counts = {
            name: getattr(result, name, 0) or 0
            for name in ("candles_fetched", "candles_written", "requests", "rate_limit_wait")
        }
        failed = status != Run.Status.SUCCESS
        if _can_release_in_one_statement(Job.objects.db):
            state = self._release_in_one_statement(now, status, counts, error, failed, next_run_at, job_status)
            owned = state is not None
            if owned:
                # What the release committed, for whoever reports the job's new state (the live hub).
                for name, value in zip(_RELEASED_FIELDS, state, strict=True):
                    setattr(self.job, name, value)
        else:
            job_changes: dict = {
                "consecutive_failures": F("consecutive_failures") + 1 if failed else 0,
                "last_error": error,
            }
            if not failed:
                job_changes["last_success_at"] = now
            if next_run_at is not None:
                job_changes["next_run_at"] = next_run_at
            if job_status is not None:
                job_changes["status"] = job_status
            with transaction.atomic():
                # The job row first: its lock orders this release against a concurrent reclaim.
                owned = self._owned_job().update(lease_owner="", lease_expires_at=None, updated_at=now, **job_changes)
                if owned:
                    Run.objects.filter(pk=self.pk, status=Run.Status.RUNNING).update(
                        status=status, finished_at=now, error=error, **counts
                    )
                    self.job.refresh_from_db(fields=_RELEASED_FIELDS)
        if not owned and not self._released_already():
            raise LeaseLost(self.job_id, self.worker)
        self.status, self.finished_at, self.error = status, now, error
        for name, value in counts.items():
            setattr(self, name, value)

    def _released_already(self) -> bool:
        """Whether an earlier attempt of this release landed (its answer lost with the connection).

        A Run is closed only by its own claim's release, or as "lease expired" by whoever takes its job
        over; so a closed Run without that error was closed by us, and a release retried after a
        database outage must not be applied twice nor reported as a lost lease.
        """
        return (
            Run.objects.filter(pk=self.pk).exclude(status=Run.Status.RUNNING).exclude(error=Run.LEASE_EXPIRED).exists()
        )

    def _release_in_one_statement(
        self,
        now: datetime,
        status: str,
        counts: dict,
        error: str,
        failed: bool,
        next_run_at: datetime | None,
        job_status: str | None,
    ) -> tuple | None:
        """The job's _RELEASED_FIELDS as committed, or None when the lease was not ours."""
        # One round trip and one commit instead of four: the release is most of a short job's overhead.
        # The job UPDATE takes the row lock first, as in the portable path; the Run is closed only if
        # the lease was still ours.
        sql = """
            WITH job AS (
                UPDATE jobs_job
                SET lease_owner = '', lease_expires_at = NULL, updated_at = %(now)s,
                    next_run_at = COALESCE(%(next_run_at)s::timestamptz, next_run_at),
                    status = COALESCE(%(job_status)s::varchar, status),
                    consecutive_failures = CASE WHEN %(failed)s THEN consecutive_failures + 1 ELSE 0 END,
                    last_error = %(error)s,
                    last_success_at = CASE WHEN %(failed)s THEN last_success_at ELSE %(now)s END
                WHERE id = %(job_id)s AND lease_owner = %(worker)s
                RETURNING id, {released}
            ), run AS (
                UPDATE jobs_run
                SET status = %(status)s, finished_at = %(now)s, error = %(error)s,
                    candles_fetched = %(candles_fetched)s, candles_written = %(candles_written)s,
                    requests = %(requests)s, rate_limit_wait = %(rate_limit_wait)s
                WHERE id = %(run_id)s AND status = 'running' AND EXISTS (SELECT 1 FROM job)
            )
            SELECT {released} FROM job{commit_mode}
        """
        # Asynchronous commit (outside a caller's transaction, where it would leak into theirs): a
        # release a database crash forgets leaves the job leased and its Run running; the lease
        # expires, the job is reclaimed, its Run closed as "lease expired" and collected again, which
        # is idempotent. Not waiting for the WAL flush halves a short job's overhead here.
        connection = connections[Job.objects.db]
        commit_mode = "" if connection.in_atomic_block else ", set_config('synchronous_commit', 'off', true)"
        sql = sql.format(commit_mode=commit_mode, released=", ".join(_RELEASED_FIELDS))
        params = {
            "now": now,
            "next_run_at": next_run_at,
            "job_status": job_status,
            "failed": failed,
            "error": error,
            "job_id": self.job_id,
            "worker": self.worker,
            "status": status,
            "run_id": self.pk,
            **counts,
        }
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        return row

    def succeed(self, result: object, delay_seconds: float) -> datetime:
        """Record success and schedule the next run at the next candle close (+ delay); returns it."""
        now = timezone.now()
        more = getattr(result, "more", False)
        next_run_at = now if more else self.job.next_run_after_success(now, delay_seconds)
        self._release(Run.Status.SUCCESS, result=result, next_run_at=next_run_at)
        return next_run_at

    def fail(
        self, error: str, base_seconds: float, max_seconds: float, retry_after: float | None = None, result=None
    ) -> datetime:
        """Record a transient failure and retry after exponential backoff with jitter; returns when."""
        delay = backoff_seconds(self.job.consecutive_failures + 1, base_seconds, max_seconds)
        if retry_after is not None and retry_after > delay:
            delay = float(retry_after)
        next_run_at = timezone.now() + timedelta(seconds=delay)
        self._release(Run.Status.FAILED, result=result, error=error, next_run_at=next_run_at)
        return next_run_at

    def fail_permanently(self, error: str, result=None) -> None:
        """Stop the job (status error) with a message for the operator; it waits to be resumed."""
        self._release(Run.Status.FAILED, result=result, error=error, job_status=Job.Status.ERROR)

    def release_unstarted(self) -> None:
        """Give back a claimed job that never started (shutdown): it is due again for any worker.

        The never-started Run is deleted rather than failed: nothing was attempted, and a failed run
        per deploy would only trip failure-rate alerts.
        """
        with transaction.atomic():
            if self._owned_job().update(lease_owner="", lease_expires_at=None):
                Run.objects.filter(pk=self.pk, status=Run.Status.RUNNING).delete()


class TaskLost(Exception):
    """A task's claim is gone: its lease expired and another worker took it over, or it was cancelled."""

    def __init__(self, task_id: int, worker: str) -> None:
        super().__init__(
            f"task {task_id}: the claim of worker {worker!r} is gone (lease expired and the task was "
            "reclaimed, or the task was cancelled); stop working on it"
        )
        self.task_id = task_id
        self.worker = worker


class TaskQuerySet(models.QuerySet):
    def claimable(self, now: datetime | None = None) -> "TaskQuerySet":
        """Pending tasks, and running ones whose worker's lease expired (it died or lost the database)."""
        now = now or timezone.now()
        return self.filter(
            Q(status=Task.Status.PENDING) | Q(status=Task.Status.RUNNING, lease_expires_at__lt=now),
        )

    def enqueue(self, kind: str, params: dict, user=None) -> "Task":
        """Queue a piece of background work; a `run_scheduler` worker with nothing due picks it up."""
        return self.create(kind=kind, params=params, created_by=user)

    def claim(
        self, worker: str, lease_seconds: float, kinds: list[str] | None = None, now: datetime | None = None
    ) -> "Task | None":
        """Lease the oldest claimable task (of `kinds`, if given) to `worker`; None when there is none.

        One short transaction, as for jobs: SKIP LOCKED on PostgreSQL, and the UPDATE is guarded by the
        claimable condition so that without SKIP LOCKED (SQLite) two claims still never share a task.
        A task whose lease expired `Task.MAX_ATTEMPTS` times (its worker keeps dying on it) is failed
        instead of being run again.
        """
        now = now or timezone.now()
        self.filter(status=Task.Status.RUNNING, lease_expires_at__lt=now, attempts__gte=Task.MAX_ATTEMPTS).update(
            status=Task.Status.FAILED,
            finished_at=now,
            lease_owner="",
            lease_expires_at=None,
            error=f"abandoned: the lease expired on {Task.MAX_ATTEMPTS} attempts (the worker died or hung each time)",
        )
        candidates = self.claimable(now)
        if kinds:
            candidates = candidates.filter(kind__in=kinds)
        with transaction.atomic(using=self.db):
            if connections[self.db].features.has_select_for_update_skip_locked:
                candidates = candidates.select_for_update(skip_locked=True)
            task = candidates.order_by("created_at", "pk").first()
            if task is None:
                return None
            expires = now + timedelta(seconds=lease_seconds)
            changes = {
                "status": Task.Status.RUNNING,
                "started_at": now,
                "attempts": F("attempts") + 1,
                "lease_owner": worker,
                "lease_expires_at": expires,
            }
            if not self.claimable(now).filter(pk=task.pk).update(**changes):
                return None
        task.refresh_from_db()
        task.lease_seconds = lease_seconds
        return task


class Task(models.Model):
    """Background work that is not a candle job (an export, an indicator recompute, a purge).

    Claimed by `run_scheduler` workers the way jobs are (SKIP LOCKED, a lease renewed by `report`);
    the row is the record of the attempt. What each kind does lives in `apps.jobs.tasks.HANDLERS`.
    """

    # A task is run again after its worker's lease expires, at most this many attempts in all.
    MAX_ATTEMPTS = 3
    # `report` writes at most this often, so a handler may call it for every batch it processes.
    REPORT_EVERY_SECONDS = 1.0

    class Kind(models.TextChoices):
        EXPORT = "export"
        INDICATORS = "indicators"
        PURGE = "purge"
        MARKETS = "markets"

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    kind = models.CharField(max_length=16, choices=Kind.choices)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    progress = models.FloatField(default=0.0, help_text="Share done, 0 to 1.")
    message = models.CharField(max_length=200, blank=True)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)

    objects = TaskQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "created_at"], name="task_claim_idx")]

    def __str__(self) -> str:
        return f"{self.kind} task {self.pk} ({self.status})"

    @property
    def finished(self) -> bool:
        return self.status in self.FINISHED

    def _owned(self) -> models.QuerySet:
        return Task.objects.filter(pk=self.pk, status=Task.Status.RUNNING, lease_owner=self.lease_owner)

    def report(self, progress: float, message: str = "", force: bool = False) -> None:
        """Record progress (0 to 1) and renew the lease; raises TaskLost if the claim is gone.

        Writes at most every REPORT_EVERY_SECONDS unless `force`, so calling it per batch costs nothing.
        """
        now = timezone.now()
        last = getattr(self, "_last_report", None)
        self.progress, self.message = max(0.0, min(1.0, progress)), message[:200]
        if not force and last is not None and (now - last).total_seconds() < self.REPORT_EVERY_SECONDS:
            return
        lease_seconds = getattr(self, "lease_seconds", None) or get_config().scheduler.lease_seconds
        self.lease_expires_at = now + timedelta(seconds=lease_seconds)
        if not self._owned().update(
            progress=self.progress, message=self.message, lease_expires_at=self.lease_expires_at
        ):
            raise TaskLost(self.pk, self.lease_owner)
        self._last_report = now

    def _finish(self, status: str, *, whoever_holds_it: bool = False, **changes: object) -> bool:
        now = timezone.now()
        changes = {"status": status, "finished_at": now, "lease_owner": "", "lease_expires_at": None, **changes}
        if self.lease_owner and not whoever_holds_it:
            target = self._owned()
        else:
            # Cancelled by a user, or run in the foreground without a claim (e.g. by a management command).
            target = Task.objects.filter(pk=self.pk).exclude(status__in=self.FINISHED)
        done = bool(target.update(**changes))
        if done:
            for name, value in changes.items():
                setattr(self, name, value)
        return done

    def succeed(self, result: dict) -> bool:
        """Record success with `result`; False if the claim was lost meanwhile (the new owner records)."""
        return self._finish(Task.Status.SUCCEEDED, result=result, progress=1.0, error="")

    def fail(self, error: str) -> bool:
        """Record failure with `error`; False if the claim was lost meanwhile."""
        return self._finish(Task.Status.FAILED, error=error)

    def cancel(self) -> bool:
        """Cancel a task that has not finished; its worker stops at its next `report` (TaskLost)."""
        return self._finish(Task.Status.CANCELLED, whoever_holds_it=True)
