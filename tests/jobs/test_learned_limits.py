"""Limits learned from the exchange, with real `manage.py backfill` processes against one fake Binance.

The fake enforces 300 request weight per clock minute and announces it in exchangeInfo.rateLimits as
Binance does; the connector is left at collector.yaml's default for Binance (5,400/min, burst 300), which
would blow through 300 within the first second. Every process must learn the announced limit before its
first klines request and keep the shared bucket under it together with the others.

Wall time: the real 60-second window. A shorter window would have to be announced as such (e.g.
"SECOND" x 10), and then the client would also have to read the used-weight header of that interval
(Binance names it X-MBX-USED-WEIGHT-10S) and align its arithmetic to that window; the collector reads
the minute header only and counts Binance's weight in clock minutes, so a shortened window would test a
setup no Binance answer produces. The ranges are sized to need about 1.4 windows of weight, the least
that proves the limit binds across a window boundary: a test waits for at most one minute to roll over
and takes 5-70 s, depending on where in the clock minute it starts.
"""

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.conf import settings

from apps.connectors.exchanges import announced_weight_per_minute
from apps.connectors.models import Connector
from apps.marketdata import store
from apps.marketdata.timeframes import datetime_to_ms
from apps.ratelimits.models import RateLimit, capped_limit
from tests.fakes.binance import FakeBinance
from tests.jobs.conftest import track
from tests.jobs.standins import child_env

MINUTE = 60_000
# The exchange's clock is fixed, so which candles are closed is known; the processes ask its /time.
NOW_MS = datetime_to_ms(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC))
LIMIT = 300  # request weight per clock minute at the fake
PROCESS_TIMEOUT = 240  # a stuck bucket would show as a timeout, not a hang


@pytest.fixture
def fake():
    listed = NOW_MS - 60 * 86_400_000
    symbols = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "BNB/USDT", "XRP/USDT", "ADA/USDT"]
    # 20 ms a request, as the measurements: requests are in flight while others are granted.
    server = FakeBinance(dict.fromkeys(symbols, listed), now_ms=NOW_MS, weight_limit=LIMIT, latency_ms=20)
    server.start()
    yield server
    server.stop()


def default_connector(fake: FakeBinance) -> Connector:
    connector = Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=10_000))
    assert connector.rate_limit_weight_per_minute == 5400  # collector.yaml's default, far above the exchange's
    return connector


def start_backfill(tmp_path: Path, name: str, symbols: list[str], since_ms: int) -> subprocess.Popen:
    log = (tmp_path / f"{name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "backfill", "--exchange", "binance", "--symbol", ",".join(symbols),
         "--timeframe", "1m", "--since", str(since_ms), "--workers", str(len(symbols)), "-v", "0"],
        cwd=settings.BASE_DIR,
        env=child_env(MONGODB_URI=""),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    return track(process)


def finish(process: subprocess.Popen, tmp_path: Path, name: str) -> int:
    try:
        return process.wait(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"{name} did not exit; its log:\n{(tmp_path / f'{name}.log').read_text()}") from None


def assert_complete(fake: FakeBinance, symbols: list[str], since_ms: int) -> None:
    for symbol in symbols:
        rows = store.read_candles("binance", symbol, "1m")
        assert rows == fake.closed_candles(symbol, "1m", since_ms), symbol


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_three_backfill_processes_at_the_default_limit_never_exceed_the_announced_300_per_minute(
    fake, tmp_path, api_client
):
    default_connector(fake)
    # Different symbols per process is the harder case: with the same ones, the leases would let one
    # process collect each series and the others skip it, so fewer requests would run at once.
    groups = [["BTC/USDT", "ETH/USDT"], ["SOL/USDT", "BNB/USDT"], ["XRP/USDT", "ADA/USDT"]]
    # 30 pages of 1,000 candles a series, 2 weight a page: 360 weight of klines, plus 3 x 20 for the
    # exchangeInfo each process loads and a /time per series: about 1.4 windows of the fake's 300.
    since_ms = NOW_MS - 30_000 * MINUTE
    names = [f"backfill{i}" for i in range(len(groups))]
    processes = [start_backfill(tmp_path, name, group, since_ms) for name, group in zip(names, groups, strict=True)]
    codes = [finish(process, tmp_path, name) for process, name in zip(processes, names, strict=True)]
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in names}
    assert codes == [0, 0, 0], logs

    assert fake.counts["429"] == 0, logs
    assert fake.counts["418"] == 0, logs
    assert max(fake.weight_per_minute.values()) <= LIMIT, fake.weight_per_minute
    # Not vacuous: together they needed clearly more than one window, so the limit bound across windows.
    assert fake.counts["weight"] > 1.3 * LIMIT, fake.counts
    assert len(fake.weight_per_minute) >= 2
    assert_complete(fake, [symbol for group in groups for symbol in group], since_ms)
    for name in names:
        assert "0 rate-limit answers (429/418)" in logs[name], logs[name]

    row = RateLimit.objects.get(exchange_id="binance")
    assert (row.announced_weight_per_minute, row.configured_weight_per_minute, row.capped) == (LIMIT, 5400, True)
    assert row.tokens_used == fake.counts["weight"]  # every request went through the shared bucket
    # Logged once, by whichever process learned it first, not once per process.
    assert sum("is capped" in log for log in logs.values()) == 1, logs
    # And shown to the operator.
    [shown] = api_client.get("/api/v1/ratelimits/?exchange_id=binance").data["results"]
    fields = ("announced_weight_per_minute", "configured_weight_per_minute", "capped")
    assert [shown[field] for field in fields] == [LIMIT, 5400, True]
    assert shown["effective_weight_per_minute"] < LIMIT


class OtherClient(threading.Thread):
    """Another program on the same IP: spends `weight` at the start of every window of the fake, from
    the test's own thread of control, which the collector knows nothing about but the used-weight header."""

    def __init__(self, fake: FakeBinance, weight: int) -> None:
        super().__init__(name="other-client", daemon=True)
        self.fake, self.weight = fake, weight
        self.stopping = threading.Event()
        self.spent: dict[int, int] = {}  # window number -> weight spent by this client

    def run(self) -> None:
        while not self.stopping.is_set():
            window = int(time.time() // self.fake.window_seconds)
            if window not in self.spent:
                self.fake.use_weight(self.weight)
                self.spent[window] = self.weight
            self.stopping.wait(0.005)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_weight_spent_by_another_client_on_the_ip_is_absorbed_through_the_used_weight_header(fake, tmp_path):
    default_connector(fake)
    other = OtherClient(fake, weight=150)  # half the fake's 300 a minute, every minute
    other.start()
    try:
        # 100 pages of 2: 200 weight of klines plus 20 for exchangeInfo. Our limit alone would grant 285
        # a minute; with the other client's 150 the exchange allows 150, so the header has to cut it.
        symbols = ["BTC/USDT", "ETH/USDT"]
        since_ms = NOW_MS - 50_000 * MINUTE
        process = start_backfill(tmp_path, "backfill", symbols, since_ms)
        code = finish(process, tmp_path, "backfill")
    finally:
        other.stopping.set()
        other.join()
    log = (tmp_path / "backfill.log").read_text()
    assert code == 0, log

    assert fake.counts["429"] == 0, log
    assert fake.counts["418"] == 0, log
    # The fake counts our weight; the exchange's total in a window is ours plus the other client's.
    totals = {window: used + other.spent.get(window, 0) for window, used in fake.weight_per_minute.items()}
    assert max(totals.values()) <= LIMIT, (fake.weight_per_minute, other.spent)
    # Not vacuous: what we spent did not fit into what the other client left in one window.
    assert fake.counts["weight"] > LIMIT - other.weight, fake.counts
    assert len(fake.weight_per_minute) >= 2
    assert_complete(fake, symbols, since_ms)


def exchange_info(*limits: tuple[str, int, int]) -> str:
    entries = [{"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100}]
    entries += [
        {"rateLimitType": "REQUEST_WEIGHT", "interval": interval, "intervalNum": number, "limit": limit}
        for interval, number, limit in limits
    ]
    return json.dumps({"timezone": "UTC", "rateLimits": entries, "symbols": []})


@pytest.mark.parametrize(
    ("limits", "per_minute"),
    [
        ((("MINUTE", 1, 6000),), 6000),
        ((("MINUTE", 1, 300),), 300),
        ((("MINUTE", 5, 30000),), 6000),
        ((("HOUR", 1, 60000),), 1000),
        # Shorter than a minute: the whole minute's budget must fit into one such window.
        ((("SECOND", 10, 50),), 50),
        ((("SECOND", 10, 2000), ("MINUTE", 1, 6000)), 2000),
        ((("SECOND", 1, 100), ("MINUTE", 1, 6000)), 100),
        ((), None),
    ],
)
def test_the_announced_request_weight_is_read_per_minute(limits, per_minute):
    assert announced_weight_per_minute(exchange_info(*limits)) == per_minute


@pytest.mark.parametrize(("interval", "number", "limit"), [("SECOND", 10, 50), ("SECOND", 1, 20), ("MINUTE", 1, 300)])
def test_a_connector_at_its_default_never_promises_more_than_one_announced_window_allows(interval, number, limit):
    window = {"SECOND": 1, "MINUTE": 60}[interval] * number
    capacity, refill = capped_limit(
        300, 5400 / 60, announced_weight_per_minute(exchange_info((interval, number, limit)))
    )
    # A token bucket grants its burst plus a window of refill within one window ...
    assert capacity + refill * window <= limit
    # ... and a limiter counting fixed minutes may grant a whole minute's budget at once.
    assert capacity + refill * 60 <= limit
