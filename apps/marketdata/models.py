from django.db import models


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


class Gap(models.Model):
    """A run of missing candle slots in one series, whichever store holds the candles."""

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

    class Meta:
        ordering = ["exchange_id", "symbol", "timeframe", "start_ts"]
        constraints = [
            models.UniqueConstraint(fields=["exchange_id", "symbol", "timeframe", "start_ts"], name="gap_unique_start"),
        ]
        indexes = [models.Index(fields=["exchange_id", "symbol", "timeframe", "status"], name="gap_series_idx")]

    def __str__(self) -> str:
        return f"{self.exchange_id} {self.symbol} {self.timeframe} [{self.start_ts}, {self.end_ts}]"
