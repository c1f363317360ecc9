import re
from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F, Value
from django.db.models.functions import Least
from django.utils import timezone

from apps.connectors.exchanges import is_known_exchange, is_valid_timeframe_syntax, offline_timeframes
from apps.connectors.models import Connector

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
    elif not is_valid_timeframe_syntax(timeframe):
        raise ValidationError(
            f"Timeframe {timeframe!r} is not well formed: a positive number followed by s, m, h, d, w, M or y "
            "(e.g. 1m, 4h, 1d).",
            code="bad_timeframe",
        )


class JobQuerySet(models.QuerySet):
    def due(self, now: datetime | None = None) -> "JobQuerySet":
        now = now or timezone.now()
        return self.filter(status=Job.Status.ACTIVE, connector__enabled=True, next_run_at__lte=now)

    def pause(self) -> int:
        return self.update(status=Job.Status.PAUSED, updated_at=timezone.now())

    def resume(self) -> int:
        """Activate, clear the error state, and run at once if the next run was further away."""
        now = timezone.now()
        return self.update(
            status=Job.Status.ACTIVE,
            last_error="",
            consecutive_failures=0,
            next_run_at=Least(F("next_run_at"), Value(now)),
            updated_at=now,
        )

    def run_now(self) -> int:
        now = timezone.now()
        return self.update(
            status=Job.Status.ACTIVE, last_error="", consecutive_failures=0, next_run_at=now, updated_at=now
        )


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
        if self.timeframe and self.connector_id is not None:
            try:
                validate_timeframe(self.timeframe, self.connector.exchange_id)
            except ValidationError as exc:
                errors["timeframe"] = exc.messages[0]
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


class Run(models.Model):
    """One attempt at collecting a job, recorded whatever its outcome."""

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
