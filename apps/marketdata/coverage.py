"""Coverage of the stored series, from the store's per-series statistics: no candle is counted.

For each series: first and last candle, candles stored, slots expected between them (the time grid of
timeframes.py), completeness, open gaps and their missing candles, confirmed-empty slots (Gap rows),
anomalies, when it was last collected, and its freshness (how far its newest candle is behind the last
closed one). The coverage API and the admin's stored-series page both read it from here.
"""

from collections.abc import Sequence
from datetime import datetime

from django.db.models import Count, Q, Sum

from apps.marketdata import store
from apps.marketdata.models import Gap
from apps.marketdata.timeframes import datetime_to_ms, next_candle_close, slot_before, slot_count

# Up to this many series, gap totals are read for the listed series only; beyond, in one grouped pass.
_GAP_FILTER_MAX = 1_000


def last_closed_ts(timeframe: str, now: datetime) -> int:
    """Open time of the newest candle of `timeframe` that has closed at `now`."""
    forming = slot_before(timeframe, datetime_to_ms(next_candle_close(timeframe, now)))
    return slot_before(timeframe, forming)


def gap_totals(series: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], dict]:
    """Open gaps, their missing slots and confirmed-empty slots per series (one grouped query)."""
    gaps = Gap.objects.all()
    if len(series) <= _GAP_FILTER_MAX:
        match = Q(pk__in=[])
        for exchange_id, symbol, timeframe in series:
            match |= Q(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe)
        gaps = gaps.filter(match)
    rows = gaps.values("exchange_id", "symbol", "timeframe").annotate(
        open_gaps=Count("pk", filter=Q(status=Gap.Status.OPEN)),
        open_missing=Sum("missing", filter=Q(status=Gap.Status.OPEN), default=0),
        confirmed_empty=Sum("missing", filter=Q(status=Gap.Status.CONFIRMED_EMPTY), default=0),
    )
    return {(row.pop("exchange_id"), row.pop("symbol"), row.pop("timeframe")): row for row in rows}


def coverage_rows(statistics: Sequence[store.SeriesStatistics], now: datetime) -> list[dict]:
    """One dict per series (see the module docstring), in the order given."""
    totals = gap_totals([(s.exchange_id, s.symbol, s.timeframe) for s in statistics])
    closed: dict[str, int] = {}
    rows = []
    for stats in statistics:
        timeframe = stats.timeframe
        if timeframe not in closed:
            closed[timeframe] = last_closed_ts(timeframe, now)
        last_closed = closed[timeframe]
        expected = slot_count(timeframe, stats.first_ts, stats.last_ts)
        gaps = totals.get((stats.exchange_id, stats.symbol, timeframe), {})
        behind = last_closed > stats.last_ts
        rows.append(
            {
                "exchange_id": stats.exchange_id,
                "symbol": stats.symbol,
                "timeframe": timeframe,
                "first_ts": stats.first_ts,
                "last_ts": stats.last_ts,
                "candles": stats.candles,
                "expected": expected,
                "completeness": round(min(stats.candles / expected, 1.0), 6) if expected > 0 else 0.0,
                "open_gaps": gaps.get("open_gaps", 0),
                "missing": gaps.get("open_missing", 0),
                "confirmed_empty": gaps.get("confirmed_empty", 0),
                "anomalies": stats.anomalies,
                "last_collected_at": stats.last_collected_at,
                "last_closed_ts": last_closed,
                "lag_candles": slot_count(timeframe, stats.last_ts, last_closed) - 1 if behind else 0,
                "lag_seconds": (last_closed - stats.last_ts) // 1000 if behind else 0,
            }
        )
    return rows


class StatisticsList:
    """The store's statistics matching filters, as a sliceable, countable sequence: what Django's and
    DRF's paginators take, so a page reads only its own rows."""

    def __init__(self, **filters: str | None) -> None:
        self.filters = filters

    def count(self) -> int:
        return store.count_series_statistics(**self.filters)

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, index: slice) -> list[store.SeriesStatistics]:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("StatisticsList takes slices only")
        start = index.start or 0
        limit = None if index.stop is None else max(0, index.stop - start)
        return store.series_statistics(**self.filters, offset=start, limit=limit)
