"""Indicators (RSI, EMA, SMA, MACD, Bollinger) computed with `ta` after each collection.

Placeholder: the indicators issue fills this in. Collection calls `update_indicators` after upserting.
"""


def update_indicators(exchange_id: str, symbol: str, timeframe: str, from_ts: int) -> int:
    """Recompute and store indicators for candles at or after `from_ts` (with warm-up); returns rows written."""
    return 0
