import functools
import struct

from django.conf import settings
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
    """Indicator values of one candle in the embedded store.

    `columns` names the values ("sma_20,ema_12,..."); `data` holds them packed as big-endian float64,
    one per column in that order, NaN for null. Packed rather than JSON because an update writes a
    thousand rows of a dozen floats each, and PostgreSQL parsing that much jsonb cost more than all the
    rest of an update; the bytes also compare cheaply, so unchanged rows are not rewritten. Each row
    names its own columns, so rows written before and after a config change stay readable until
    `recompute_indicators` rewrites them. Big-endian is PostgreSQL's float8send format, which the
    migration from JSON uses.

    The natural key is the primary key: a surrogate id costs a sequence and a second index on every insert.
    """

    pk = models.CompositePrimaryKey("exchange_id", "symbol", "timeframe", "ts")
    exchange_id = models.CharField(max_length=64)
    symbol = models.CharField(max_length=64)
    timeframe = models.CharField(max_length=8)
    ts = models.BigIntegerField(help_text="Open time of the candle, UTC milliseconds.")
    columns = models.TextField(blank=True, help_text="Comma-separated column names of the packed values.")
    data = models.BinaryField(help_text="One big-endian float64 per column; NaN is null.")

    class Meta:
        # Not the default name: the JSON table this replaced was renamed away in the same migration,
        # but PostgreSQL keeps its primary key index as marketdata_indicatorrow_pkey.
        db_table = "marketdata_indicator"

    def __str__(self) -> str:
        return f"{self.exchange_id} {self.symbol} {self.timeframe} {self.ts}"

    @property
    def values(self) -> dict[str, float | None]:
        return unpack_values(self.columns, self.data)


@functools.lru_cache(maxsize=64)
def _layout(columns: str) -> tuple[tuple[str, ...], struct.Struct]:
    names = tuple(columns.split(",")) if columns else ()
    return names, struct.Struct(f">{len(names)}d")


def unpack_values(columns: str, data: bytes | memoryview) -> dict[str, float | None]:
    """An IndicatorRow's packed values as {column: value or None}."""
    names, layout = _layout(columns)
    return {name: None if value != value else value for name, value in zip(names, layout.unpack(data), strict=True)}


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


class SeriesStatistics(models.Model):
    """What the SQL store knows about each of its series without counting candles: kept current by every
    upsert and delete (sqlstore.py), read by the coverage API and the admin's stored-series page.

    The MongoDB store keeps the same fields as documents of its `series_stats` collection. The natural
    key is the primary key, as for IndicatorRow.
    """

    pk = models.CompositePrimaryKey("exchange_id", "symbol", "timeframe")
    exchange_id = models.CharField(max_length=64)
    symbol = models.CharField(max_length=64)
    timeframe = models.CharField(max_length=8)
    first_ts = models.BigIntegerField(help_text="Open time of the oldest stored candle, UTC ms.")
    last_ts = models.BigIntegerField(help_text="Open time of the newest stored candle, UTC ms.")
    candles = models.BigIntegerField(default=0, help_text="Candles stored.")
    anomalies = models.BigIntegerField(default=0, help_text="Stored candles breaking OHLC invariants.")
    last_collected_at = models.DateTimeField(null=True, blank=True, help_text="Time of the last upsert.")

    class Meta:
        verbose_name_plural = "series statistics"

    def __str__(self) -> str:
        return f"{self.exchange_id} {self.symbol} {self.timeframe}"


class AnomalyQuerySet(models.QuerySet):
    def for_series(self, exchange_id: str, symbol: str, timeframe: str) -> "AnomalyQuerySet":
        return self.filter(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe)

    def within(self, start_ts: int | None, end_ts: int | None) -> "AnomalyQuerySet":
        queryset = self
        if start_ts is not None:
            queryset = queryset.filter(ts__gte=start_ts)
        if end_ts is not None:
            queryset = queryset.filter(ts__lte=end_ts)
        return queryset

    def record(self, exchange_id: str, symbol: str, timeframe: str, flagged: list[tuple], revised_ts: list[int]) -> int:
        """Bring the series' anomalies in line with a written batch; returns the change in their number.

        `flagged` holds (ts, kind, open, high, low, close) of the batch's candles that break an invariant;
        anomalies at `revised_ts` (candles the batch rewrote) that are not flagged any more are removed.
        The portable path (SQLite, MongoDB); PostgreSQL does the same inside its upsert statement.
        """
        series = self.for_series(exchange_id, symbol, timeframe)
        delta = 0
        if revised_ts:
            keep = {(row[0], row[1]) for row in flagged}
            stale = [
                pk
                for pk, ts, kind in series.filter(ts__in=revised_ts).values_list("pk", "ts", "kind")
                if (ts, kind) not in keep
            ]
            if stale:
                delta -= series.filter(pk__in=stale).delete()[0]
        if flagged:
            existing = set(series.filter(ts__in=[row[0] for row in flagged]).values_list("ts", "kind"))
            delta += sum(1 for row in flagged if (row[0], row[1]) not in existing)
            self.bulk_create(
                [
                    Anomaly(
                        exchange_id=exchange_id,
                        symbol=symbol,
                        timeframe=timeframe,
                        ts=ts,
                        kind=kind,
                        open=o,
                        high=h,
                        low=lo,
                        close=c,
                    )
                    for ts, kind, o, h, lo, c in flagged
                ],
                update_conflicts=True,
                unique_fields=["exchange_id", "symbol", "timeframe", "ts", "kind"],
                update_fields=["open", "high", "low", "close"],
            )
        return delta


class Anomaly(models.Model):
    """A stored candle that breaks an OHLC invariant, one row per (series, ts, kind).

    The candle itself is stored as the exchange sent it (a faithful record); this row says it is odd.
    Written by the store in the same upsert call as the candle, only for such candles, and removed when
    a revision of the candle fixes it or the candle is deleted.
    """

    class Kind(models.TextChoices):
        HIGH_BELOW = "high_below", "high below open, close or low"
        LOW_ABOVE = "low_above", "low above open or close"

    exchange_id = models.CharField(max_length=64)
    symbol = models.CharField(max_length=64)
    timeframe = models.CharField(max_length=8)
    ts = models.BigIntegerField(help_text="Open time of the candle, UTC ms.")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    open = models.FloatField()
    high = models.FloatField()
    low = models.FloatField()
    close = models.FloatField()
    detected_at = models.DateTimeField(default=timezone.now)

    objects = AnomalyQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "anomalies"
        ordering = ["exchange_id", "symbol", "timeframe", "ts", "kind"]
        constraints = [
            models.UniqueConstraint(fields=["exchange_id", "symbol", "timeframe", "ts", "kind"], name="anomaly_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.exchange_id} {self.symbol} {self.timeframe} {self.ts} {self.kind}"


class ExportQuerySet(models.QuerySet):
    def visible_to(self, user) -> "ExportQuerySet":
        """The exports `user` may see and download: their own; staff and superusers see every one."""
        if user.is_staff or user.is_superuser:
            return self
        return self.filter(created_by=user)

    def expired(self, now=None) -> "ExportQuerySet":
        """Exports past their expiry whose files are still on disk."""
        return self.filter(expires_at__lt=now or timezone.now()).exclude(file_path="")


class Export(models.Model):
    """A file of stored candles (and indicators) for one exchange, some symbols and timeframes.

    Written in the background by a `run_scheduler` worker (its `task`, of kind export; status, progress
    and error live there) or in the foreground by `manage.py export`; apps/marketdata/exports.py writes
    it. The file lives under settings.EXPORT_DIR until `expires_at`, then it is deleted.
    """

    class Format(models.TextChoices):
        CSV = "csv"
        JSON = "json"
        PARQUET = "parquet"
        FREQTRADE = "freqtrade"

    task = models.OneToOneField("jobs.Task", on_delete=models.CASCADE, related_name="export")
    exchange_id = models.CharField(max_length=64)
    symbols = models.JSONField(default=list)
    timeframes = models.JSONField(default=list)
    start_ts = models.BigIntegerField(null=True, blank=True, help_text="First candle open time, UTC ms, inclusive.")
    end_ts = models.BigIntegerField(null=True, blank=True, help_text="Last candle open time, UTC ms, inclusive.")
    format = models.CharField(max_length=16, choices=Format.choices)
    indicators = models.BooleanField(default=False)
    rows = models.BigIntegerField(default=0, help_text="Candles written.")
    size = models.BigIntegerField(default=0, help_text="Bytes of the file.")
    file_path = models.CharField(max_length=500, blank=True, help_text="Relative to EXPORT_DIR; blank when none.")
    expires_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="exports"
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = ExportQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["expires_at"], name="export_expiry_idx")]

    def __str__(self) -> str:
        series = f"{','.join(self.symbols)} {','.join(self.timeframes)}"
        return f"export {self.pk}: {self.exchange_id} {series} {self.format}"

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class IndicatorConfigQuerySet(models.QuerySet):
    def stored(self) -> dict | None:
        """The indicator section stored by PUT /api/v1/indicators/config (its YAML form), or None."""
        return self.filter(pk=IndicatorConfig.SINGLETON).values_list("config", flat=True).first()


class IndicatorConfig(models.Model):
    """The indicator set in force when an operator stored one (the API's PUT); without this row, the
    `indicators` section of collector.yaml. One row, validated exactly as that section is."""

    SINGLETON = 1

    config = models.JSONField(help_text="The `indicators` section in its YAML form: rsi, ema, sma, macd, bollinger.")
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    objects = IndicatorConfigQuerySet.as_manager()

    class Meta:
        verbose_name = "indicator configuration"

    def __str__(self) -> str:
        return "indicator configuration"
