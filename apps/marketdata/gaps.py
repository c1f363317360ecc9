"""Gap bookkeeping: the missing ranges of each series, kept as Gap rows in the Django database.

The candle store finds the holes (store.find_gaps); this module keeps the Gap table in step with them
after each collection, hands the open ones to the job for refetching, and confirms as empty the ranges
the exchange keeps answering with nothing, so they are not refetched forever. Gaps are never filled
with made-up candles.
"""

from django.db import transaction

from apps.marketdata import store
from apps.marketdata.models import Gap
from apps.marketdata.timeframes import slot_after, slot_before, slot_count
from apps.monitoring.metrics import GAPS_DETECTED, series_labels


def _subtract(timeframe: str, ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the inclusive slot ranges not covered by any of the (inclusive) holes."""
    result = []
    for first, last in ranges:
        pieces = [(first, last)]
        for hole_first, hole_last in holes:
            remaining = []
            for a, b in pieces:
                if hole_last < a or hole_first > b:
                    remaining.append((a, b))
                    continue
                if a < hole_first:
                    remaining.append((a, slot_before(timeframe, hole_first)))
                if hole_last < b:
                    remaining.append((slot_after(timeframe, hole_last), b))
            pieces = remaining
        result.extend(pieces)
    return sorted(result)


def sync_gaps(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> list[Gap]:
    """Bring the series' Gap rows in line with the store between the bounds; return the gaps there.

    Bounds default to the first and last stored candle (so a series is not blamed for history before
    its listing). Missing ranges get an open Gap each; open gaps that were filled are deleted, partly
    filled ones shrink or split (a gap keeps its attempts while its first slot stays missing).
    Confirmed-empty gaps are left as they are unless no slot of theirs is missing any more, and new
    missing slots next to one become a separate open gap rather than reopening it.
    """
    series_gaps = Gap.objects.for_series(exchange_id, symbol, timeframe)
    touched = series_gaps.overlapping(start_ts, end_ts)
    # Judge every gap the bounds touch as a whole, and keep recorded gaps that lie before the first or
    # after the last stored candle (a history that starts later than the job asked for) when a bound
    # is left to default to the stored range.
    starts = [*touched.values_list("start_ts", flat=True)]
    ends = [*touched.values_list("end_ts", flat=True)]
    if start_ts is None:
        starts.append(store.first_ts(exchange_id, symbol, timeframe))
    else:
        starts.append(start_ts)
    if end_ts is None:
        ends.append(store.last_ts(exchange_id, symbol, timeframe))
    else:
        ends.append(end_ts)
    start_ts = min((ts for ts in starts if ts is not None), default=None)
    end_ts = max((ts for ts in ends if ts is not None), default=None)
    missing = store.find_gaps(exchange_id, symbol, timeframe, start_ts, end_ts)

    with transaction.atomic():
        current = list(
            Gap.objects.for_series(exchange_id, symbol, timeframe).overlapping(start_ts, end_ts).select_for_update()
        )
        confirmed = [g for g in current if g.status == Gap.Status.CONFIRMED_EMPTY]
        still_missing = [
            g for g in confirmed if _subtract(timeframe, [(g.start_ts, g.end_ts)], missing) != [(g.start_ts, g.end_ts)]
        ]
        Gap.objects.filter(pk__in=[g.pk for g in confirmed if g not in still_missing]).delete()

        wanted = {
            first: last for first, last in _subtract(timeframe, missing, [(g.start_ts, g.end_ts) for g in confirmed])
        }
        open_gaps = {g.start_ts: g for g in current if g.status == Gap.Status.OPEN}
        detected = 0
        Gap.objects.filter(pk__in=[g.pk for start, g in open_gaps.items() if start not in wanted]).delete()
        for first, last in wanted.items():
            count = slot_count(timeframe, first, last)
            gap = open_gaps.get(first)
            if gap is None:
                detected += 1
                Gap.objects.create(
                    exchange_id=exchange_id,
                    symbol=symbol,
                    timeframe=timeframe,
                    start_ts=first,
                    end_ts=last,
                    missing=count,
                )
            elif (gap.end_ts, gap.missing) != (last, count):
                gap.end_ts, gap.missing = last, count
                gap.save(update_fields=["end_ts", "missing", "updated_at"])
    if detected:
        GAPS_DETECTED.labels(*series_labels(exchange_id, symbol, timeframe)).inc(detected)
    return list(Gap.objects.for_series(exchange_id, symbol, timeframe).overlapping(start_ts, end_ts))


def gaps_to_refetch(exchange_id: str, symbol: str, timeframe: str) -> list[Gap]:
    """The series' open gaps, oldest first: what the job's next run should fetch again."""
    return list(Gap.objects.for_series(exchange_id, symbol, timeframe).open().order_by("start_ts"))


def record_refetch(gap: Gap, found: int, confirm_after: int = 3) -> Gap | None:
    """Record the outcome of refetching a gap's range; `found` is how many candles the exchange returned.

    Nothing found counts as an empty attempt; after `confirm_after` of them the gap is confirmed empty.
    Candles found were stored by the caller, so the gap is re-synced with the store: it disappears when
    filled (None is returned) or shrinks to what is still missing.
    """
    if found <= 0:
        gap.record_empty_refetch(confirm_after)
        return gap
    sync_gaps(gap.exchange_id, gap.symbol, gap.timeframe, gap.start_ts, gap.end_ts)
    return Gap.objects.filter(pk=gap.pk).first()
