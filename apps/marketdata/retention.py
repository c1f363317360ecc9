"""Retention: how long candles are kept, the purge that applies it, and deleting a whole series.

A series keeps its candles for the connector's `retention_days` when its exchange's connector sets one,
else for its timeframe's period in collector.yaml (`retention.days`), else forever. The cutoff is
`now - period`: a candle whose open time is at or after the cutoff is kept, one opening before it is
deleted, with the series' indicator rows and anomalies before the cutoff; gaps wholly before it go, a
gap across it is trimmed to start at the cutoff. The store corrects the series' statistics.

`purge()` is what `manage.py purge` and the schedulers' daily purge task (`run_purge_task`) run.
"""

import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from apps.connectors.models import Connector
from apps.jobs.models import Task
from apps.marketdata import store
from apps.marketdata.models import Anomaly, Gap
from apps.marketdata.timeframes import (
    align_up,
    datetime_to_ms,
    is_calendar_timeframe,
    slot_after,
    slot_count,
    timeframe_ms,
)
from datacollector.config import CollectorConfig, get_config

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000


@dataclasses.dataclass(frozen=True)
class Purge:
    """What the purge does (or would do) to one series."""

    exchange_id: str
    symbol: str
    timeframe: str
    days: int
    cutoff_ts: int
    candles: int
    indicators: int = 0
    gaps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RetentionPolicy:
    """The retention periods in force: the connectors' and collector.yaml's, read once."""

    def __init__(self, config: CollectorConfig | None = None) -> None:
        self.by_timeframe = dict((config or get_config()).retention.days)
        self.by_exchange = dict(
            Connector.objects.filter(retention_days__isnull=False).values_list("exchange_id", "retention_days")
        )

    def days(self, exchange_id: str, timeframe: str) -> int | None:
        """Days a series keeps its candles, None for forever."""
        return self.by_exchange.get(exchange_id) or self.by_timeframe.get(timeframe)

    def cutoff(self, exchange_id: str, timeframe: str, now: datetime) -> int | None:
        """The oldest open time kept (UTC ms), or None when the series keeps everything."""
        days = self.days(exchange_id, timeframe)
        return None if days is None else datetime_to_ms(now) - days * DAY_MS


def plan(now: datetime | None = None, policy: RetentionPolicy | None = None, count: bool = True) -> list[Purge]:
    """What a purge at `now` would delete: series with candles before their cutoff, with `count` how many
    per series (over the part of its index that goes; a purge that deletes them counts what it deletes)."""
    now = now or timezone.now()
    policy = policy or RetentionPolicy()
    planned = []
    for stats in store.series_statistics():
        cutoff = policy.cutoff(stats.exchange_id, stats.timeframe, now)
        if cutoff is None or stats.first_ts >= cutoff:
            continue
        series = (stats.exchange_id, stats.symbol, stats.timeframe)
        candles = store.coverage(*series, end_ts=cutoff - 1).count if count else 0
        days = policy.days(stats.exchange_id, stats.timeframe)
        planned.append(Purge(*series, days=days, cutoff_ts=cutoff, candles=candles))  # type: ignore[arg-type]
    return planned


def purge(
    now: datetime | None = None, dry_run: bool = False, progress: Callable[[float, str], None] | None = None
) -> list[Purge]:
    """Apply the retention periods at `now`; with `dry_run`, only report what would go.

    `progress(share, message)` is called after each series (a task's `report`, which renews its lease).
    """
    planned = plan(now, count=dry_run)
    if dry_run:
        return planned
    done = []
    for index, item in enumerate(planned, 1):
        done.append(purge_series(item.exchange_id, item.symbol, item.timeframe, item.cutoff_ts, item.days))
        logger.info("Purged %s", done[-1].as_dict())
        if progress is not None:
            progress(index / len(planned), f"{index} of {len(planned)} series purged")
    return done


def purge_series(exchange_id: str, symbol: str, timeframe: str, cutoff_ts: int, days: int = 0) -> Purge:
    """Delete what opens before `cutoff_ts`: candles (with their anomalies), indicator rows, gaps."""
    series = (exchange_id, symbol, timeframe)
    candles = store.delete_series(*series, end_ts=cutoff_ts - 1)
    indicators = store.delete_indicator_range(*series, end_ts=cutoff_ts - 1)
    gaps, _ = Gap.objects.for_series(*series).filter(end_ts__lt=cutoff_ts).delete()
    for gap in Gap.objects.for_series(*series).filter(start_ts__lt=cutoff_ts):
        if is_calendar_timeframe(timeframe):
            start = gap.start_ts
            while start < cutoff_ts:
                start = slot_after(timeframe, start)
        else:
            start = align_up(cutoff_ts, gap.start_ts, timeframe_ms(timeframe))
        gap.start_ts, gap.missing = start, slot_count(timeframe, start, gap.end_ts)
        gap.save(update_fields=["start_ts", "missing", "updated_at"])
    return Purge(*series, days=days, cutoff_ts=cutoff_ts, candles=candles, indicators=indicators, gaps=gaps)


def drop_series(exchange_id: str, symbol: str, timeframe: str) -> dict[str, int]:
    """Delete a whole series: candles, indicator rows, gaps, anomalies and statistics."""
    series = (exchange_id, symbol, timeframe)
    anomalies = Anomaly.objects.for_series(*series).count()  # the store deletes them with the candles
    candles = store.delete_series(*series)
    indicators = store.delete_indicator_range(*series)
    gaps, _ = Gap.objects.for_series(*series).delete()
    return {"candles": candles, "indicators": indicators, "gaps": gaps, "anomalies": anomalies}


def run_purge_task(task: Task) -> dict[str, Any]:
    """The handler of a purge Task (apps.jobs): apply retention now; the result is what was deleted."""
    done = purge(progress=task.report)
    return {
        "series": len(done),
        "candles": sum(p.candles for p in done),
        "indicators": sum(p.indicators for p in done),
        "gaps": sum(p.gaps for p in done),
    }


# The key of the PostgreSQL advisory lock that serialises the daily purge's enqueueing across processes.
_DAILY_PURGE_LOCK = 0x64635F7075726765  # "dc_purge"


def schedule_daily_purge(now: datetime | None = None) -> Task | None:
    """Queue today's purge task unless one was queued today (UTC) already; None when none was queued.

    Every run_scheduler process calls this now and then; one task a day results however many run, as
    the check and the insert happen under one lock (PostgreSQL: an advisory lock held to the commit;
    SQLite's write transactions are serialised anyway). Nothing is queued when no retention is set.
    """
    now = now or timezone.now()
    policy = RetentionPolicy()
    if not policy.by_timeframe and not policy.by_exchange:
        return None
    day = now.date().isoformat()
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_DAILY_PURGE_LOCK])
        if Task.objects.filter(kind=Task.Kind.PURGE, params__day=day).exists():
            return None
        return Task.objects.enqueue(Task.Kind.PURGE, {"day": day})
