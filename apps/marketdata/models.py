from django.db import models
from django.db.models import F
from django.utils import timezone


class Candle(models.Model):
    """The embedded candle store's table, used when no MONGODB_URI is configured (see store.py)."""

    exchange_id = models.CharField(max_length=64)
    symbol = models.CharField(max_length=64)
    timeframe = models.CharField(max_length=8)
    ts = models.BigIntegerField(help_text="Open time, UTC milliseconds.")
    open = models.FloatField()
    high = models.FloatField()
    low = models.FloatField()
    close = models.FloatField()
    volume = models.FloatField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["exchange_id", "symbol", "timeframe", "ts"], name="candle_unique_key"),
        ]

    def __str__(self) -> str:
        return f"{self.exchange_id} {self.symbol} {self.timeframe} {self.ts}"


class IndicatorRow(models.Model):
    """Indicator values of one candle in the embedded store; `values` maps column name to value or null."""

    exchange_id = models.CharField(max_length=64)
    symbol = models.CharField(max_length=64)
    timeframe = models.CharField(max_length=8)
    ts = models.BigIntegerField(help_text="Open time of the candle, UTC milliseconds.")
    values = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["exchange_id", "symbol", "timeframe", "ts"], name="indicator_unique_key"),
        ]

    def __str__(self) -> str:
        return f"{self.exchange_id} {self.symbol} {self.timeframe} {self.ts}"


class GapQuerySet(models.QuerySet):
    def for_series(self, exchange_id: str, symbol: str, timeframe: str) -> "GapQuerySet":
        return self.filter(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe)

    def open(self) -> "GapQuerySet":
        return self.filter(status=Gap.Status.OPEN)

    def overlapping(self, start_ts: int | None, end_ts: int | None) -> "GapQuerySet":
        """Gaps sharing at least one slot with the inclusive range (an open bound matches everything)."""
        queryset = self
        if start_ts is not None:
            queryset = queryset.filter(end_ts__gte=start_ts)
        if end_ts is not None:
            queryset = queryset.filter(start_ts__lte=end_ts)
        return queryset

    def reopen(self) -> int:
        """Queue the gaps for refetching again, forgetting earlier empty attempts (the admin's "refetch")."""
        return self.update(status=Gap.Status.OPEN, attempts=0, updated_at=timezone.now())


class Gap(models.Model):
    """A run of missing candle slots in one series, whichever store holds the candles.

    Gaps are found by comparing the stored candles with the timeframe's slots (see gaps.sync_gaps). An
    open gap is refetched by the job's next runs; one the exchange answers empty `confirm_after` times in
    a row becomes confirmed_empty (the exchange has no data there, e.g. a maintenance window) and is not
    refetched again unless an operator reopens it.
    """

    class Status(models.TextChoices):
        OPEN = "open"
        CONFIRMED_EMPTY = "confirmed_empty"

    exchange_id = models.CharField(max_length=64)
    symbol = models.CharField(max_length=64)
    timeframe = models.CharField(max_length=8)
    start_ts = models.BigIntegerField(help_text="Open time of the first missing candle, UTC ms.")
    end_ts = models.BigIntegerField(help_text="Open time of the last missing candle, UTC ms.")
    missing = models.PositiveIntegerField(help_text="Number of missing slots.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    attempts = models.PositiveIntegerField(default=0, help_text="Refetches that came back empty.")
    detected_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = GapQuerySet.as_manager()

    class Meta:
        ordering = ["exchange_id", "symbol", "timeframe", "start_ts"]
        constraints = [
            models.UniqueConstraint(fields=["exchange_id", "symbol", "timeframe", "start_ts"], name="gap_unique_start"),
        ]
        indexes = [models.Index(fields=["exchange_id", "symbol", "timeframe", "status"], name="gap_series_idx")]

    def __str__(self) -> str:
        return f"{self.exchange_id} {self.symbol} {self.timeframe} [{self.start_ts}, {self.end_ts}]"

    def record_empty_refetch(self, confirm_after: int = 3) -> None:
        """Count a refetch of the whole gap that returned no candle; confirm it empty after enough of them.

        The increment is done in the database so two workers recording at once both count.
        """
        Gap.objects.filter(pk=self.pk).update(attempts=F("attempts") + 1, updated_at=timezone.now())
        Gap.objects.filter(pk=self.pk, status=Gap.Status.OPEN, attempts__gte=confirm_after).update(
            status=Gap.Status.CONFIRMED_EMPTY, updated_at=timezone.now()
        )
        self.refresh_from_db(fields=["attempts", "status", "updated_at"])
