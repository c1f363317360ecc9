"""`backfill` with the real ccxt library against the fake Binance server, faults on.

The end state must be exactly the server's closed candles: none missing, none duplicated, none
unclosed, and not a single 429 although several workers share a weight limit the backfill would blow
through on its own. The server counts weight in 2-second windows (Binance: clock minutes) so the
limit binds within a test of a few seconds; the connector's bucket is sized the way collector.yaml
sizes Binance's, burst plus one window of refill below the server's limit.
"""

import io
from datetime import UTC, datetime

import pytest
from django.core.management import call_command

from apps.connectors import exchanges
from apps.connectors.exchanges import RetryPolicy
from apps.connectors.models import Connector
from apps.jobs.models import Job, Run
from apps.marketdata import store
from apps.marketdata.models import Gap
from apps.marketdata.timeframes import datetime_to_ms
from apps.ratelimits.models import RateLimit
from tests.fakes.binance import FakeBinance, Faults

NOW_MS = datetime_to_ms(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC))
MINUTE = 60_000
SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
WINDOW_SECONDS = 2.0
WINDOW_LIMIT = 100  # weight per window at the server
# The bucket: 30 burst + 2 s x 20/s = 70 weight in any 2 s, below the server's 100 even when a request
# granted at the end of one window reaches the server in the next.
BURST, PER_MINUTE = 30, 1200


@pytest.fixture(autouse=True)
def setup(settings, monkeypatch):
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    monkeypatch.setattr(exchanges, "RETRY_POLICY", RetryPolicy(initial_seconds=0.01, max_seconds=0.1))
    exchanges.clear_clients()
    yield
    exchanges.clear_clients()


@pytest.fixture
def fake():
    # SOL lists 30 minutes into the range: history before a listing is neither fetched nor a gap.
    listings = {"BTC/USDT": NOW_MS - 5 * 86_400_000, "ETH/USDT": NOW_MS - 5 * 86_400_000}
    listings["SOL/USDT"] = NOW_MS - 2_000 * MINUTE
    server = FakeBinance(listings, now_ms=NOW_MS, weight_limit=WINDOW_LIMIT, window_seconds=WINDOW_SECONDS)
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_backfill_with_faults_ends_with_exactly_the_servers_closed_candles(fake):
    minute = NOW_MS // MINUTE * MINUTE
    holes = {"BTC/USDT": (minute - 1_000 * MINUTE, minute - 990 * MINUTE), "ETH/USDT": (minute - 10 * MINUTE,) * 2}
    fake.holes = {(symbol, "1m"): [hole] for symbol, hole in holes.items()}
    fake.faults = Faults(
        server_error=0.06, timeout=0.04, short_page=0.12, empty_page=0.1, truncated=0.06, timeout_seconds=0.6
    )
    # Each kind of fault at least once, early, whatever the random draws do.
    fake.script.extend(["server_error", "timeout", "short_page", "empty_page", "truncated", "empty_page"])
    fake.latency = 0.005
    Connector.objects.create(
        exchange_id="binance",
        options=fake.ccxt_options(timeout=300),
        rate_limit_weight_per_minute=PER_MINUTE,
        rate_limit_burst=BURST,
    )
    since_ms = NOW_MS - 2_030 * MINUTE
    out = io.StringIO()
    call_command(
        "backfill", "--exchange", "binance", "--symbol", ",".join(SYMBOLS), "--timeframe", "1m",
        "--since", str(since_ms), "--workers", "3", stdout=out, stderr=io.StringIO(), verbosity=0,
    )  # fmt: skip

    for symbol in SYMBOLS:
        rows = store.read_candles("binance", symbol, "1m")
        assert rows == fake.closed_candles(symbol, "1m", since_ms), symbol
        assert rows[-1][0] + MINUTE <= NOW_MS  # nothing unclosed
    assert fake.counts["429"] == 0
    assert fake.counts["418"] == 0
    assert max(fake.weight_per_minute.values()) <= WINDOW_LIMIT
    injected = {
        name: fake.counts[name] for name in ("server_error", "timeout", "short_page", "empty_page", "truncated")
    }
    assert all(injected.values()), injected  # the faults did happen

    # The exchange's own holes are gaps, refetched once already, never filled.
    gaps = {(gap.symbol, gap.start_ts, gap.end_ts) for gap in Gap.objects.all()}
    assert gaps == {(symbol, hole[0], hole[-1]) for symbol, hole in holes.items()}
    assert set(Gap.objects.values_list("status", flat=True)) == {Gap.Status.OPEN}
    assert set(Run.objects.values_list("status", flat=True)) == {Run.Status.SUCCESS}
    assert "0 rate-limit answers (429/418), 2 open gaps" in out.getvalue()
    bucket = RateLimit.objects.get(exchange_id="binance")
    assert bucket.tokens_used == fake.counts["weight"]  # every request went through the shared bucket


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_second_backfill_asks_only_for_what_is_new(fake):
    Connector.objects.create(
        exchange_id="binance",
        options=fake.ccxt_options(timeout=1000),
        rate_limit_weight_per_minute=PER_MINUTE,
        rate_limit_burst=BURST,
    )
    args = [
        "--exchange",
        "binance",
        "--symbol",
        "BTC/USDT",
        "--timeframe",
        "1m",
        "--since",
        str(NOW_MS - 1_500 * MINUTE),
    ]
    call_command("backfill", *args, stdout=io.StringIO(), verbosity=0)
    first_pages = len(fake.klines_requests)

    fake.fixed_now_ms = NOW_MS + 30 * MINUTE
    call_command("backfill", *args, stdout=io.StringIO(), verbosity=0)
    assert len(fake.klines_requests) == first_pages + 1  # one page from the cursor on
    assert fake.klines_requests[-1]["start"] == Job.objects.get().cursor - 29 * MINUTE
    assert store.read_candles("binance", "BTC/USDT", "1m") == fake.closed_candles(
        "BTC/USDT", "1m", NOW_MS - 1_500 * MINUTE
    )
