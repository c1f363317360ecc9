"""Gap detection (store.find_gaps, on every backend) and the Gap rows kept by gaps.py."""

import pytest

from apps.marketdata import gaps, mongostore, store
from apps.marketdata.models import Gap

pytestmark = [pytest.mark.django_db, pytest.mark.filterwarnings("ignore:'allowDiskUse'")]

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC, a Monday
SERIES = ("binance", "BTC/USDT", "1m")


def store_minutes(*indexes: int, series: tuple[str, str, str] = SERIES, step: int = MINUTE) -> None:
    store.upsert_candles(*series, [[T0 + i * step, 1.0, 2.0, 0.5, 1.5, 10.0] for i in indexes])


def at(i: int, step: int = MINUTE) -> int:
    return T0 + i * step


# --- find_gaps ------------------------------------------------------------------------------------


def test_a_complete_series_has_no_gaps(candle_store):
    store_minutes(*range(10))

    assert store.find_gaps(*SERIES) == []
    assert store.find_gaps(*SERIES, start_ts=at(0), end_ts=at(9)) == []


def test_an_empty_series_has_no_gaps_without_bounds(candle_store):
    assert store.find_gaps(*SERIES) == []
    assert store.find_gaps(*SERIES, start_ts=at(0)) == []


def test_holes_between_stored_candles_are_reported_as_inclusive_ranges(candle_store):
    store_minutes(0, 1, 3, 4, 8, 9, 11)

    assert store.find_gaps(*SERIES) == [(at(2), at(2)), (at(5), at(7)), (at(10), at(10))]


def test_bounds_add_leading_and_trailing_gaps(candle_store):
    store_minutes(3, 4, 6)

    assert store.find_gaps(*SERIES, start_ts=at(0), end_ts=at(9)) == [
        (at(0), at(2)),
        (at(5), at(5)),
        (at(7), at(9)),
    ]


def test_bounds_inside_the_series_limit_the_search(candle_store):
    store_minutes(0, 2, 4, 6, 8)

    assert store.find_gaps(*SERIES, start_ts=at(3), end_ts=at(6)) == [(at(3), at(3)), (at(5), at(5))]
    assert store.find_gaps(*SERIES, start_ts=at(4), end_ts=at(4)) == []


def test_bounds_between_slots_are_rounded_inwards_onto_the_series_grid(candle_store):
    store_minutes(2, 3)

    assert store.find_gaps(*SERIES, start_ts=at(0) - 1, end_ts=at(5) + 30_000) == [(at(0), at(1)), (at(4), at(5))]
    assert store.find_gaps(*SERIES, start_ts=at(1) + 1, end_ts=at(4) - 1) == []


def test_an_empty_series_with_bounds_is_one_gap_on_the_utc_grid(candle_store):
    assert store.find_gaps(*SERIES, start_ts=at(0) + 1, end_ts=at(5)) == [(at(1), at(5))]
    assert store.find_gaps("binance", "BTC/USDT", "1h", start_ts=T0 - 1, end_ts=T0 + HOUR) == [(T0, T0 + HOUR)]


def test_weekly_slots_of_an_empty_series_fall_on_mondays(candle_store):
    week = 7 * DAY
    assert store.find_gaps("binance", "BTC/USDT", "1w", start_ts=T0 - DAY, end_ts=T0 + week + DAY) == [(T0, T0 + week)]


def test_a_range_with_no_candle_uses_the_grid_of_the_rest_of_the_series(candle_store):
    # Daily candles opening at 08:00 UTC, as some exchanges publish them.
    offset = 8 * HOUR
    store_minutes(0, series=("okx", "BTC/USDT", "1d"), step=DAY)
    store.upsert_candles("okx", "BTC/USDT", "1d", [[T0 + offset + i * DAY, 1.0, 1.0, 1.0, 1.0, 1.0] for i in (5, 6)])
    store.delete_series("okx", "BTC/USDT", "1d", end_ts=T0)

    assert store.find_gaps("okx", "BTC/USDT", "1d", start_ts=T0, end_ts=T0 + 3 * DAY) == [
        (T0 + offset, T0 + offset + 2 * DAY)
    ]


def test_gaps_are_per_series(candle_store):
    store_minutes(0, 5)
    store_minutes(*range(6), series=("binance", "ETH/USDT", "1m"))

    assert store.find_gaps(*SERIES) == [(at(1), at(4))]
    assert store.find_gaps("binance", "ETH/USDT", "1m") == []


def test_hourly_gaps_use_the_timeframe_length(candle_store):
    series = ("binance", "BTC/USDT", "1h")
    store_minutes(0, 1, 5, series=series, step=HOUR)

    assert store.find_gaps(*series) == [(at(2, HOUR), at(4, HOUR))]


def test_monthly_gaps_follow_the_calendar(candle_store):
    series = ("binance", "BTC/USDT", "1M")
    months = [1_704_067_200_000, 1_706_745_600_000, 1_714_521_600_000]  # 2024-01-01, 02-01, 05-01
    store.upsert_candles(*series, [[ts, 1.0, 1.0, 1.0, 1.0, 1.0] for ts in months])

    march, april, june, july = 1_709_251_200_000, 1_711_929_600_000, 1_717_200_000_000, 1_719_792_000_000
    assert store.find_gaps(*series) == [(march, april)]
    december, mid_november = 1_701_388_800_000, 1_700_006_400_000  # 2023-12-01, 2023-11-15
    assert store.find_gaps(*series, start_ts=mid_november, end_ts=july + 5) == [
        (december, december),
        (march, april),
        (june, july),
    ]
    assert store.find_gaps(*series, start_ts=months[0] - 1, end_ts=months[1]) == []


def test_start_after_end_is_rejected(candle_store):
    with pytest.raises(ValueError, match="after"):
        store.find_gaps(*SERIES, start_ts=at(5), end_ts=at(1))


def test_sql_gap_search_handles_many_candles_and_holes(sql_store):
    present = [i for i in range(20_000) if i % 1000 not in (10, 11, 12)]
    store_minutes(*present)

    found = store.find_gaps(*SERIES)

    assert len(found) == 20
    assert found[0] == (at(10), at(12))
    assert found[-1] == (at(19_010), at(19_012))


def test_the_streaming_fallback_finds_the_same_holes():
    assert mongostore.holes_from_stream([0, 1, 3, 7, 8], 1) == [(2, 2), (4, 6)]


# --- Gap rows -------------------------------------------------------------------------------------


def gap_ranges() -> list[tuple[int, int, str, int]]:
    return [(g.start_ts, g.end_ts, g.status, g.missing) for g in Gap.objects.for_series(*SERIES)]


def test_sync_records_each_missing_range_as_an_open_gap(candle_store):
    store_minutes(0, 1, 4, 5, 9)

    synced = gaps.sync_gaps(*SERIES)

    assert gap_ranges() == [(at(2), at(3), "open", 2), (at(6), at(8), "open", 3)]
    assert [(g.start_ts, g.end_ts) for g in synced] == [(at(2), at(3)), (at(6), at(8))]
    assert [g.start_ts for g in gaps.gaps_to_refetch(*SERIES)] == [at(2), at(6)]


def test_sync_is_idempotent(candle_store):
    store_minutes(0, 3)
    gaps.sync_gaps(*SERIES)
    first = Gap.objects.get()

    gaps.sync_gaps(*SERIES)

    again = Gap.objects.get()
    assert (again.pk, again.updated_at) == (first.pk, first.updated_at)


def test_filled_gaps_are_removed_and_partly_filled_ones_shrink_or_split(candle_store):
    store_minutes(0, 10, 20, 30)
    gaps.sync_gaps(*SERIES)
    assert len(gap_ranges()) == 3

    store_minutes(*range(1, 10))  # fills the first gap
    store_minutes(15)  # splits the second
    store_minutes(21, 22)  # shrinks the third from the front
    gaps.sync_gaps(*SERIES)

    assert gap_ranges() == [
        (at(11), at(14), "open", 4),
        (at(16), at(19), "open", 4),
        (at(23), at(29), "open", 7),
    ]


def test_sync_with_bounds_records_leading_and_trailing_gaps_and_keeps_them_later(candle_store):
    store_minutes(3, 4)

    gaps.sync_gaps(*SERIES, start_ts=at(0), end_ts=at(6))
    assert gap_ranges() == [(at(0), at(2), "open", 3), (at(5), at(6), "open", 2)]

    # A later sync with default bounds must not forget ranges outside the stored candles.
    gaps.sync_gaps(*SERIES)
    assert gap_ranges() == [(at(0), at(2), "open", 3), (at(5), at(6), "open", 2)]


def test_sync_only_touches_its_own_series(candle_store):
    other = ("binance", "ETH/USDT", "1m")
    store_minutes(0, 2, series=other)
    gaps.sync_gaps(*other)
    store_minutes(0, 5)

    gaps.sync_gaps(*SERIES)

    assert Gap.objects.for_series(*other).count() == 1
    assert gap_ranges() == [(at(1), at(4), "open", 4)]


def test_empty_refetches_confirm_a_gap_after_the_threshold(candle_store):
    store_minutes(0, 3)
    [gap] = gaps.sync_gaps(*SERIES)

    for attempt in (1, 2):
        assert gaps.record_refetch(gap, found=0, confirm_after=3) is gap
        assert (gap.attempts, gap.status) == (attempt, Gap.Status.OPEN)
    gaps.record_refetch(gap, found=0, confirm_after=3)

    assert (gap.attempts, gap.status) == (3, Gap.Status.CONFIRMED_EMPTY)
    assert gaps.gaps_to_refetch(*SERIES) == []


def test_a_confirmed_empty_gap_survives_sync_and_new_neighbouring_holes_open_separately(candle_store):
    store_minutes(0, 3, 4, 5, 6)
    [gap] = gaps.sync_gaps(*SERIES)
    gap.status = Gap.Status.CONFIRMED_EMPTY
    gap.save()

    store.delete_series(*SERIES, start_ts=at(3), end_ts=at(3))  # now minutes 1-3 are missing
    gaps.sync_gaps(*SERIES)

    assert gap_ranges() == [(at(1), at(2), "confirmed_empty", 2), (at(3), at(3), "open", 1)]
    assert [g.start_ts for g in gaps.gaps_to_refetch(*SERIES)] == [at(3)]


def test_a_confirmed_empty_gap_that_got_filled_is_removed(candle_store):
    store_minutes(0, 2)
    [gap] = gaps.sync_gaps(*SERIES)
    Gap.objects.filter(pk=gap.pk).update(status=Gap.Status.CONFIRMED_EMPTY)

    store_minutes(1)
    gaps.sync_gaps(*SERIES)

    assert gap_ranges() == []


def test_a_refetch_that_found_candles_resyncs_the_gap(candle_store):
    store_minutes(0, 10)
    [gap] = gaps.sync_gaps(*SERIES)
    gaps.record_refetch(gap, found=0)

    store_minutes(*range(5, 10))  # the exchange had the later half
    remaining = gaps.record_refetch(gap, found=5)

    assert remaining is not None
    assert (remaining.pk, remaining.start_ts, remaining.end_ts, remaining.attempts) == (gap.pk, at(1), at(4), 1)

    store_minutes(*range(1, 5))
    assert gaps.record_refetch(remaining, found=4) is None
    assert gap_ranges() == []


def test_reopen_queues_confirmed_gaps_again(candle_store):
    store_minutes(0, 2)
    [gap] = gaps.sync_gaps(*SERIES)
    Gap.objects.filter(pk=gap.pk).update(status=Gap.Status.CONFIRMED_EMPTY, attempts=3)

    assert Gap.objects.all().reopen() == 1

    gap.refresh_from_db()
    assert (gap.status, gap.attempts) == (Gap.Status.OPEN, 0)
