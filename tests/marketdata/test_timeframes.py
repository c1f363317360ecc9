from datetime import UTC, datetime

import ccxt
import pytest

from apps.marketdata.timeframes import (
    InvalidTimeframe,
    check_timeframe,
    datetime_to_ms,
    is_valid_timeframe,
    ms_to_datetime,
    next_candle_close,
    slot_after,
    slot_before,
    slot_count,
    timeframe_ms,
)


@pytest.mark.parametrize("timeframe", ["1s", "1m", "15m", "4h", "1d", "3d", "1w", "1M", "1y"])
def test_lengths_are_ccxts(timeframe):
    assert timeframe_ms(timeframe) == ccxt.Exchange.parse_timeframe(timeframe) * 1000


@pytest.mark.parametrize("bad", ["", "0m", "01m", "1", "m", "1x", "1 m", "1.5h", None, 5])
def test_malformed_timeframes_have_one_message(bad):
    assert not is_valid_timeframe(bad)
    with pytest.raises(InvalidTimeframe, match="not well formed: a positive number followed by s, m, h, d, w, M or y"):
        check_timeframe(bad)


def test_ms_and_datetime_round_trip_exactly():
    moment = datetime(2024, 2, 29, 23, 59, 59, 999_000, tzinfo=UTC)
    assert datetime_to_ms(moment) == 1_709_251_199_999
    assert ms_to_datetime(1_709_251_199_999) == moment
    assert datetime_to_ms(datetime(2024, 1, 1)) == 1_704_067_200_000  # naive is UTC


def test_calendar_slots_follow_the_calendar():
    jan, feb, mar = (datetime_to_ms(datetime(2024, m, 1, tzinfo=UTC)) for m in (1, 2, 3))
    assert slot_after("1M", jan) == feb
    assert slot_before("1M", mar) == feb
    assert slot_count("1M", jan, mar) == 3
    assert slot_after("1y", jan) == datetime_to_ms(datetime(2025, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("timeframe", "expected"),
    [
        ("1m", datetime(2026, 3, 14, 15, 10, tzinfo=UTC)),
        ("4h", datetime(2026, 3, 14, 16, tzinfo=UTC)),
        ("1w", datetime(2026, 3, 16, tzinfo=UTC)),  # a Monday
        ("1M", datetime(2026, 4, 1, tzinfo=UTC)),
        ("3M", datetime(2026, 4, 1, tzinfo=UTC)),
        ("1y", datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
def test_next_candle_close_is_on_the_exchange_grid(timeframe, expected):
    assert next_candle_close(timeframe, datetime(2026, 3, 14, 15, 9, 30, tzinfo=UTC)) == expected
