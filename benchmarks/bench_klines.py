"""Binance klines through ccxt: the generic `fetch_ohlcv` (parse_ohlcv per candle) against the raw
implicit endpoint `publicGetKlines` with the collector's own conversion (what `CcxtClient` does for
Binance), side by side against the local fake Binance (no latency), 1,000-candle pages.

Prints pages/s, candles/s and microseconds per candle of each path. Needs no database.
"""

import time

import ccxt

from tests.fakes.binance import FakeBinance

PAGES = 200
LIMIT = 1000
MINUTE = 60_000


def _raw_rows(raw: list) -> list[list[float]]:
    # The same conversion as apps.connectors.exchanges.CcxtClient._raw_klines.
    return [[int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])] for r in raw]


def main() -> None:
    now_ms = 1_709_294_430_000
    listing = now_ms - PAGES * LIMIT * MINUTE
    with FakeBinance({"BTC/USDT": listing}, now_ms=now_ms, weight_limit=10**9) as fake:
        exchange = ccxt.binance({"enableRateLimit": False, **fake.ccxt_options()})
        exchange.options["fetchMarkets"] = {"types": ["spot"]}
        exchange.load_markets()
        paths = {
            "fetch_ohlcv (ccxt parse_ohlcv)": lambda since: exchange.fetch_ohlcv(
                "BTC/USDT", "1m", since=since, limit=LIMIT
            ),
            "publicGetKlines + own conversion": lambda since: _raw_rows(
                exchange.publicGetKlines({"symbol": "BTCUSDT", "interval": "1m", "startTime": since, "limit": LIMIT})
            ),
        }
        results = {}
        for name, fetch in paths.items():
            fetch(listing)  # warm up
            started, candles = time.perf_counter(), 0
            for page in range(PAGES):
                candles += len(fetch(listing + page * LIMIT * MINUTE))
            seconds = time.perf_counter() - started
            results[name] = seconds / candles * 1e6
            print(f"{name:36s} {PAGES / seconds:8.1f} pages/s {candles / seconds:10.0f} candles/s "
                  f"{results[name]:6.2f} us/candle (server, HTTP and JSON included)")  # fmt: skip
        generic, raw = results.values()
        print(f"raw path saves {generic - raw:.2f} us a candle ({generic / raw:.2f}x)")
