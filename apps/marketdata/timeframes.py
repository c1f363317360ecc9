"""The time grid: timeframes, candle slots, the next candle close, and ms <-> datetime.

A timeframe is a positive number and a unit (`1m`, `4h`, `1w`, `1M`), as ccxt and the exchanges write
it. A candle's `ts` is its open time in UTC milliseconds. Candles of seconds, minutes, hours and days
open on multiples of their length since the epoch; weeks open on Mondays (Binance, and ccxt's
convention; the epoch was a Thursday); months and years open on the first of the calendar period,
00:00 UTC. The lengths are ccxt's (`Exchange.parse_timeframe`): a month counts as 30 days and a year
as 365 where a length is needed at all (a request's page span), never for the calendar grid itself.

This module imports no other app, so every app may import it.
"""

import calendar
import re
from datetime import UTC, datetime, timedelta

_TIMEFRAME_RE = re.compile(r"^[1-9][0-9]*[smhdwMy]$")

# Seconds per unit, as ccxt's Exchange.parse_timeframe counts them.
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800, "M": 2_592_000, "y": 31_536_000}

# The Monday 1970-01-05 00:00 UTC: weekly candles open on Mondays, and epoch 0 was a Thursday.
WEEK_ORIGIN_MS = 4 * 86_400_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class InvalidTimeframe(ValueError):
    """A timeframe that is not a positive number followed by one of s m h d w M y."""

    def __init__(self, timeframe: object) -> None:
        super().__init__(timeframe_error(timeframe))
        self.timeframe = timeframe


def timeframe_error(timeframe: object) -> str:
    """The one message for a malformed timeframe (API, admin, commands and the store all use it)."""
    return (
        f"Timeframe {timeframe!r} is not well formed: a positive number followed by s, m, h, d, w, M or y "
        "(e.g. 1m, 4h, 1d)."
    )


def is_valid_timeframe(timeframe: object) -> bool:
    return isinstance(timeframe, str) and bool(_TIMEFRAME_RE.match(timeframe))


def check_timeframe(timeframe: object) -> str:
    """The timeframe itself when well formed; else InvalidTimeframe with the one message."""
    if not is_valid_timeframe(timeframe):
        raise InvalidTimeframe(timeframe)
    return timeframe  # type: ignore[return-value]


def timeframe_ms(timeframe: str) -> int:
    """Length of one candle in milliseconds (a month counts as 30 days and a year as 365, as in ccxt)."""
    check_timeframe(timeframe)
    return int(timeframe[:-1]) * _UNIT_SECONDS[timeframe[-1]] * 1000


# --- ms <-> datetime ----------------------------------------------------------------------------------


def ms_to_datetime(ms: int) -> datetime:
    """The aware UTC datetime of epoch milliseconds (exact: no float on the way)."""
    return _EPOCH + ms * _MS


def datetime_to_ms(value: datetime) -> int:
    """Epoch milliseconds of a datetime (a naive one is taken as UTC), sub-millisecond part dropped."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MS


# --- Slots ------------------------------------------------------------------------------------------


def is_calendar_timeframe(timeframe: str) -> bool:
    """Months and years have no fixed length: their slots are calendar boundaries, not multiples of a step."""
    return timeframe[-1:] in ("M", "y")


def months_per_slot(timeframe: str) -> int:
    return int(timeframe[:-1]) * (12 if timeframe.endswith("y") else 1)


def month_index(ts: int) -> int:
    """Months since year 0 of the month holding `ts` (year * 12 + month - 1)."""
    moment = ms_to_datetime(ts)
    return moment.year * 12 + moment.month - 1


def month_start(index: int) -> int:
    """Open time (ms) of the month `index` (see month_index)."""
    return calendar.timegm((index // 12, index % 12 + 1, 1, 0, 0, 0)) * 1000


def slot_after(timeframe: str, ts: int) -> int:
    """Open time of the slot following the one opening at `ts`."""
    if is_calendar_timeframe(timeframe):
        return month_start(month_index(ts) + months_per_slot(timeframe))
    return ts + timeframe_ms(timeframe)


def slot_before(timeframe: str, ts: int) -> int:
    """Open time of the slot preceding the one opening at `ts`."""
    if is_calendar_timeframe(timeframe):
        return month_start(month_index(ts) - months_per_slot(timeframe))
    return ts - timeframe_ms(timeframe)


def slot_count(timeframe: str, first_ts: int, last_ts: int) -> int:
    """Number of slots in the inclusive range of slot open times [first_ts, last_ts]."""
    if is_calendar_timeframe(timeframe):
        return (month_index(last_ts) - month_index(first_ts)) // months_per_slot(timeframe) + 1
    return (last_ts - first_ts) // timeframe_ms(timeframe) + 1


def grid_origin(timeframe: str) -> int:
    """A slot open time of a fixed-length timeframe on the exchanges' grid: Monday for weeks, else the epoch."""
    return WEEK_ORIGIN_MS if timeframe.endswith("w") else 0


def align_up(value: int, anchor: int, step: int) -> int:
    """The first slot at or after `value` on the grid of `step` through `anchor`."""
    return anchor - ((anchor - value) // step) * step


def align_down(value: int, anchor: int, step: int) -> int:
    """The last slot at or before `value` on the grid of `step` through `anchor`."""
    return anchor + ((value - anchor) // step) * step


def next_candle_close(timeframe: str, now: datetime) -> datetime:
    """The first candle close of `timeframe` strictly after `now`, on the exchange's grid (UTC).

    Seconds, minutes, hours and days are multiples of the timeframe since the epoch, weeks start on
    Mondays, months and years on the first of the calendar period.
    """
    now_ms = datetime_to_ms(now)
    if is_calendar_timeframe(timeframe):
        months = months_per_slot(timeframe)
        index = month_index(now_ms) - 1970 * 12
        return ms_to_datetime(month_start((index // months + 1) * months + 1970 * 12))
    step = timeframe_ms(timeframe)
    origin = grid_origin(timeframe)
    return ms_to_datetime(((now_ms - origin) // step + 1) * step + origin)
