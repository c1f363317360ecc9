"""Charts of stored series for the admin: candles, volume, indicator overlays and RSI, drawn as SVG on
the server, so they need no JavaScript bundle and work on a machine without internet access.

The x axis is time, not candle index: a hole in the data shows as a hole in the chart, which is what
an operator checking a series' completeness needs to see.
"""

import math
from dataclasses import dataclass, field
from datetime import datetime

from apps.marketdata import store
from apps.marketdata.timeframes import ms_to_datetime, slot_after, slot_before

WIDTH = 1100
PRICE_HEIGHT = 380
VOLUME_HEIGHT = 90
RSI_HEIGHT = 110
LEFT, RIGHT, GAP = 10, 80, 14
# Overlays drawn on the price panel, in this order, when the series has them stored.
OVERLAY_PREFIXES = ("bb_upper", "bb_middle", "bb_lower", "sma_", "ema_")
OVERLAY_COLOURS = (
    "#9c27b0",
    "#ff9800",
    "#2196f3",
    "#009688",
    "#795548",
    "#607d8b",
    "#e91e63",
    "#3f51b5",
    "#8bc34a",
    "#00bcd4",
)
MIN_CANDLES, MAX_CANDLES = 10, 2000


@dataclass(frozen=True)
class Line:
    name: str
    colour: str
    paths: list[str]  # one SVG path per unbroken run of values (nulls break the line)


@dataclass
class Chart:
    candles: list[dict] = field(default_factory=list)
    volume: list[dict] = field(default_factory=list)
    overlays: list[Line] = field(default_factory=list)
    rsi: Line | None = None
    price_ticks: list[dict] = field(default_factory=list)
    time_ticks: list[dict] = field(default_factory=list)
    first: datetime | None = None
    last: datetime | None = None
    width: int = WIDTH
    price_top: int = 0
    volume_top: int = PRICE_HEIGHT + GAP
    rsi_top: int = PRICE_HEIGHT + GAP + VOLUME_HEIGHT + GAP
    height: int = PRICE_HEIGHT + GAP + VOLUME_HEIGHT + GAP + RSI_HEIGHT
    plot_right: int = WIDTH - RIGHT
    rsi_lines: list[dict] = field(default_factory=list)


def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _label(value: float) -> str:
    return f"{value:,.{max(0, 2 - math.floor(math.log10(abs(value))))}f}" if value else "0"


def build_chart(exchange_id: str, symbol: str, timeframe: str, count: int) -> Chart | None:
    """The last `count` slots of the series as SVG geometry, or None when nothing is stored."""
    last = store.last_ts(exchange_id, symbol, timeframe)
    if last is None:
        return None
    start = last
    for _ in range(count - 1):
        start = slot_before(timeframe, start)
    rows = store.read_candles(exchange_id, symbol, timeframe, start_ts=start, end_ts=last)
    stored = dict(store.read_indicators(exchange_id, symbol, timeframe, start_ts=start, end_ts=last))

    span = max(slot_after(timeframe, last) - start, 1)
    plot_width = WIDTH - LEFT - RIGHT
    slot_width = plot_width * (slot_after(timeframe, start) - start) / span

    def x(ts: int) -> float:
        return LEFT + plot_width * (ts - start) / span + slot_width / 2

    overlay_names = [
        name
        for prefix in OVERLAY_PREFIXES
        for name in sorted({n for values in stored.values() for n in values if n.startswith(prefix)})
    ]
    prices = [v for row in rows for v in (row[2], row[3])]
    prices += [v for values in stored.values() for n in overlay_names if (v := values.get(n)) is not None]
    low, high = min(prices), max(prices)
    pad = (high - low) * 0.04 or abs(high) * 0.01 or 1.0
    low, high = low - pad, high + pad

    def y(price: float) -> float:
        return PRICE_HEIGHT * (high - price) / (high - low)

    chart = Chart(first=ms_to_datetime(start), last=ms_to_datetime(last))
    body = max(slot_width * 0.7, 1.0)
    max_volume = max((row[5] for row in rows), default=0) or 1.0
    for ts, open_, high_, low_, close, volume in rows:
        top, bottom = y(max(open_, close)), y(min(open_, close))
        centre = x(ts)
        chart.candles.append(
            {
                "x": round(centre - body / 2, 2),
                "centre": round(centre, 2),
                "width": round(body, 2),
                "top": round(top, 2),
                "height": round(max(bottom - top, 1.0), 2),
                "wick_top": round(y(high_), 2),
                "wick_bottom": round(y(low_), 2),
                "up": close >= open_,
                "title": f"{ms_to_datetime(ts):%Y-%m-%d %H:%M} O {open_:g} H {high_:g} "
                f"L {low_:g} C {close:g} V {volume:g}",
            }
        )
        height = VOLUME_HEIGHT * volume / max_volume
        chart.volume.append(
            {
                "x": round(centre - body / 2, 2),
                "width": round(body, 2),
                "y": round(chart.volume_top + VOLUME_HEIGHT - height, 2),
                "height": round(height, 2),
                "up": close >= open_,
            }
        )

    def line(name: str, colour: str, scale) -> Line:
        paths, current = [], []
        for ts in sorted(stored):
            value = stored[ts].get(name)
            if value is None:
                if current:
                    paths.append(current)
                current = []
                continue
            current.append(f"{x(ts):.2f},{scale(value):.2f}")
        if current:
            paths.append(current)
        return Line(name, colour, ["M" + " L".join(points) for points in paths])

    chart.overlays = [line(name, OVERLAY_COLOURS[i % len(OVERLAY_COLOURS)], y) for i, name in enumerate(overlay_names)]
    rsi_name = next((n for values in stored.values() for n in sorted(values) if n.startswith("rsi_")), None)
    if rsi_name is not None:
        chart.rsi = line(rsi_name, "#673ab7", lambda value: chart.rsi_top + RSI_HEIGHT * (100 - value) / 100)
        chart.rsi_lines = [
            {"y": round(chart.rsi_top + RSI_HEIGHT * (100 - level) / 100, 2), "label": level} for level in (30, 50, 70)
        ]
    chart.price_ticks = [{"y": round(y(v), 2), "label": _label(v)} for v in _nice_ticks(low, high)]
    step = max(1, len(rows) // 6)
    chart.time_ticks = [
        {"x": round(x(row[0]), 2), "label": f"{ms_to_datetime(row[0]):%m-%d %H:%M}"}
        # Start half a step in, so the first label is not cut off at the left edge.
        for row in rows[step // 2 :: step]
    ]
    return chart
