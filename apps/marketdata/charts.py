"""The data of the admin's chart of a stored series: candles, volume and the stored indicators, as the
browser's chart (TradingView's lightweight-charts, served from static/vendor, so it works offline) draws
them, and why an indicator is blank where its warm-up has not been reached.

The page (`admin/marketdata/series_chart.html`, `static/marketdata/chart.js`) draws the newest slots,
then appends the candles the hub (`/ws`, channel `ohlcv`) pushes as they are stored.
"""

from datetime import datetime
from typing import Any

from apps.marketdata import store
from apps.marketdata.indicators import indicator_set
from apps.marketdata.timeframes import ms_to_datetime, slot_before

MIN_CANDLES, MAX_CANDLES = 10, 2000
# Indicators drawn over the candles (same scale); the others (RSI, MACD) get a pane of their own.
OVERLAY_PREFIXES = ("sma_", "ema_", "bb_")


def is_overlay(name: str) -> bool:
    return name.startswith(OVERLAY_PREFIXES)


def warmup_notes() -> dict[str, str]:
    """Indicator name -> why it is blank at the start of a series (its warm-up), per the configured set."""
    notes = {}
    for column in indicator_set().columns:
        first = column.stable_from + 1
        if column.name.startswith(("sma_", "bb_")):
            why = "a full window of closes"
        elif column.changes:
            why = f"its seed to have faded to below 1e-10 and {column.changes} price changes after it"
        else:
            why = "its seed (the first close) to have faded to below 1e-10 of the price"
        notes[column.name] = f"blank until candle {first:,} of the series: it needs {why}"
    return notes


def build_chart(exchange_id: str, symbol: str, timeframe: str, count: int) -> dict[str, Any] | None:
    """The last `count` slots of the series for the chart (times in UTC seconds), or None when nothing
    is stored."""
    last = store.last_ts(exchange_id, symbol, timeframe)
    if last is None:
        return None
    start = last
    for _ in range(count - 1):
        start = slot_before(timeframe, start)
    rows = store.read_candles(exchange_id, symbol, timeframe, start_ts=start, end_ts=last)
    stored = store.read_indicators(exchange_id, symbol, timeframe, start_ts=start, end_ts=last)
    names = sorted({name for _ts, values in stored for name in values})
    indicators: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for ts, values in stored:
        for name in names:
            value = values.get(name)
            # A whitespace point (time only) keeps the line's gap where the value is blank.
            indicators[name].append({"time": ts // 1000} if value is None else {"time": ts // 1000, "value": value})
    notes = warmup_notes()
    first_stored = store.first_ts(exchange_id, symbol, timeframe)
    return {
        "exchange": exchange_id,
        "symbol": symbol,
        "timeframe": timeframe,
        "candles": [
            {"time": ts // 1000, "open": o, "high": h, "low": lo, "close": c, "volume": v}
            for ts, o, h, lo, c, v in rows
        ],
        "indicators": indicators,
        "overlays": [name for name in names if is_overlay(name)],
        "panes": [name for name in names if not is_overlay(name)],
        # Why each indicator is blank where it is: the warm-up counted from the series' first candle.
        "warmup": {name: notes.get(name, "blank where its warm-up has not been reached") for name in names},
        "series_start": _iso(first_stored),
        "window_start": _iso(start),
    }


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    value: datetime = ms_to_datetime(ts)
    return value.strftime("%Y-%m-%d %H:%M UTC")
