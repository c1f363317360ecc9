"""Exchange clients: the `ExchangeClient` protocol, the ccxt client, the offline `simulated` exchange,
and the classification of exchange errors into transient (retry) and permanent (stop the job).
"""

import functools
import re
from typing import Protocol

import ccxt

SIMULATED = "simulated"

SIMULATED_TIMEFRAMES = ("1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w")

_TIMEFRAME_RE = re.compile(r"^[1-9][0-9]*[smhdwMy]$")


class ExchangeError(Exception):
    """Base of the errors collection raises; the message is what the operator sees."""


class TransientExchangeError(ExchangeError):
    """Worth retrying later: network, timeout, exchange unavailable, rate limited."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentExchangeError(ExchangeError):
    """Retrying cannot help (bad symbol, authentication, not supported): the job stops until resumed."""


class ExchangeClient(Protocol):
    exchange_id: str

    def fetch_ohlcv(self, symbol: str, timeframe: str, since_ms: int, limit: int) -> list[list[float]]: ...

    def request_weight(self, timeframe: str, limit: int) -> int: ...

    def page_limit(self) -> int: ...

    def markets(self) -> list[str]: ...

    def timeframes(self) -> list[str]: ...

    def server_time_ms(self) -> int: ...


def known_exchange_ids() -> list[str]:
    return [SIMULATED, *ccxt.exchanges]


def is_known_exchange(exchange_id: str) -> bool:
    return exchange_id == SIMULATED or exchange_id in ccxt.exchanges


@functools.cache
def offline_timeframes(exchange_id: str) -> tuple[str, ...]:
    """The timeframes an exchange offers, as ccxt knows them without the network.

    Empty when the exchange declares none offline; callers then accept any well-formed timeframe and
    leave the final word to the exchange at collection time.
    """
    if exchange_id == SIMULATED:
        return SIMULATED_TIMEFRAMES
    exchange_class = getattr(ccxt, exchange_id)
    return tuple((exchange_class().timeframes or {}).keys())


def is_valid_timeframe_syntax(timeframe: str) -> bool:
    return bool(_TIMEFRAME_RE.match(timeframe))


def timeframe_ms(timeframe: str) -> int:
    """Length of one candle in milliseconds (a month counts as 31 days, as in ccxt)."""
    return int(ccxt.Exchange.parse_timeframe(timeframe) * 1000)
