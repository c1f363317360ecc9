"""The fake Binance's fast klines pages serve exactly what `FakeBinance.kline()` defines, byte for byte.

`kline()` is the definition of the fake's data (tests compare collections against it); `klines_body()`
makes whole pages with less CPU for the benchmarks, and must never serve anything else. Checked directly
and through HTTP (with and without kept pages), so a faster fake cannot change what any test sees.
"""

import json
import urllib.request
from datetime import UTC, datetime

import pytest

from apps.marketdata.timeframes import datetime_to_ms
from tests.fakes.binance import INTERVALS_MS, FakeBinance

NOW_MS = datetime_to_ms(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC))
LISTED = NOW_MS - 40 * 86_400_000


def reference_body(fake: FakeBinance, market: str, interval: str, first: int, last: int) -> bytes:
    rows = [fake.kline(market, interval, ts) for ts in range(first, last + 1, INTERVALS_MS[interval])]
    return json.dumps(rows, separators=(",", ":")).encode()


def fetch(fake: FakeBinance, query: str) -> bytes:
    with urllib.request.urlopen(f"{fake.url}/api/v3/klines?{query}", timeout=10) as answer:
        return answer.read()


@pytest.mark.parametrize("interval", ["1m", "1h", "1d"])
@pytest.mark.parametrize("symbol", ["BTC/USDT", "DOGE/USDT"])
def test_page_bodies_are_the_klines_definition_byte_for_byte(symbol, interval):
    fake = FakeBinance({symbol: LISTED}, now_ms=NOW_MS)
    market, step = symbol.replace("/", ""), INTERVALS_MS[interval]
    first = fake.first_open(market, interval)
    last = min(NOW_MS // step * step, first + 999 * step)

    assert fake.klines_body(market, interval, first, last) == reference_body(fake, market, interval, first, last)
    assert fake.klines_body(market, interval, first + step, first) == b"[]"


def test_served_pages_equal_the_definition_with_and_without_kept_pages():
    fake = FakeBinance({"BTC/USDT": LISTED}, now_ms=NOW_MS)
    start = NOW_MS // 60_000 * 60_000 - 2_500 * 60_000
    with fake:
        queries = [
            # A startTime between open times: the page starts at the next one.
            (f"symbol=BTCUSDT&interval=1m&startTime={start + 17}&limit=1000", start + 60_000),
            # The newest page without startTime, and a page ending at endTime.
            ("symbol=BTCUSDT&interval=1m&limit=300", NOW_MS // 60_000 * 60_000 - 299 * 60_000),
            (f"symbol=BTCUSDT&interval=1m&startTime={start}&endTime={start + 99 * 60_000}", start),
        ]
        expected = [
            reference_body(fake, "BTCUSDT", "1m", first, last)
            for first, last in [
                (queries[0][1], queries[0][1] + 999 * 60_000),
                (queries[1][1], NOW_MS // 60_000 * 60_000),
                (start, start + 99 * 60_000),
            ]
        ]
        assert [fetch(fake, query) for query, _ in queries] == expected

        assert fake.warm("BTC/USDT", "1m", start) == 3
        assert [fetch(fake, query) for query, _ in queries] == expected
        assert len(fake._pages) >= 3  # served from kept pages from here on


def test_holes_are_still_left_out_of_served_pages():
    start = NOW_MS // 60_000 * 60_000 - 10 * 60_000
    fake = FakeBinance(
        {"BTC/USDT": LISTED}, now_ms=NOW_MS, holes={("BTC/USDT", "1m"): [(start + 60_000, start + 120_000)]}
    )
    with fake:
        rows = json.loads(fetch(fake, f"symbol=BTCUSDT&interval=1m&startTime={start}&limit=5"))
    assert [row[0] for row in rows] == [start, start + 180_000, start + 240_000, start + 300_000, start + 360_000]
