"""Collection with pages requested ahead (`collect_job(prefetch=...)`, what `backfill` uses).

Helper threads send the requests, each with its own client and database connection (hence
transactional tests), and the pages after the next are guessed. The outcome must be the sequential
collection's: the same candles, cursor, gaps and request count when every page comes back full.
"""

from datetime import UTC, datetime

import pytest

from apps.connectors import exchanges
from apps.connectors.models import Connector
from apps.jobs.collect import collect_job
from apps.jobs.models import Job
from apps.marketdata import store
from apps.marketdata.models import Gap
from apps.marketdata.timeframes import datetime_to_ms, ms_to_datetime
from apps.ratelimits.models import RateLimit
from tests.fakes.binance import FakeBinance

NOW_MS = datetime_to_ms(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC))
MINUTE = 60_000
LAST_CLOSED = NOW_MS // MINUTE * MINUTE - MINUTE
# Not on a minute: the exchange answers from the next open time, which the first guess must allow for.
SINCE_MS = NOW_MS - 5_000 * MINUTE + 7_000


def noop() -> None:
    pass


@pytest.fixture(autouse=True)
def setup(settings, monkeypatch):
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    monkeypatch.setattr(exchanges, "RETRY_POLICY", exchanges.RetryPolicy(initial_seconds=0, max_seconds=0))
    monkeypatch.setitem(
        exchanges.PROFILES, "binance", exchanges.dataclasses.replace(exchanges.PROFILES["binance"], page_limit=100)
    )
    exchanges.clear_clients()
    yield
    exchanges.clear_clients()


@pytest.fixture
def fake():
    server = FakeBinance({"BTC/USDT": SINCE_MS - 86_400_000}, now_ms=NOW_MS, weight_limit=10**6).start()
    yield server
    server.stop()


def make_job(fake: FakeBinance) -> Job:
    connector = Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=5_000))
    return Job.objects.create(connector=connector, symbol="BTC/USDT", timeframe="1m", since=ms_to_datetime(SINCE_MS))


@pytest.mark.django_db(transaction=True)
def test_guessed_pages_are_used_when_every_page_is_full(fake):
    job = make_job(fake)
    result = collect_job(job, None, noop, max_pages=None, prefetch=3)

    assert store.read_candles("binance", "BTC/USDT", "1m") == fake.closed_candles("BTC/USDT", "1m", SINCE_MS)
    assert Job.objects.get(pk=job.pk).cursor == LAST_CLOSED
    assert result.complete
    # 5,000 candles in pages of 100 (the last one asks one slot more): no request was wasted.
    assert len(fake.klines_requests) == result.pages == 50
    # And the server time and the markets (loaded once for the three helpers), counted across clients.
    assert result.requests == 52
    assert fake.counts["requests"] == 52
    assert RateLimit.objects.get(exchange_id="binance").tokens_used == fake.counts["weight"]


@pytest.mark.django_db(transaction=True)
def test_holes_and_short_pages_give_the_sequential_outcome(fake):
    hole = (LAST_CLOSED - 3_000 * MINUTE, LAST_CLOSED - 2_950 * MINUTE)
    fake.holes = {("BTC/USDT", "1m"): [hole]}
    fake.script.extend(["", "short_page", "", "", "short_page", "empty_page"])
    job = make_job(fake)
    result = collect_job(job, None, noop, max_pages=None, prefetch=3)

    assert store.read_candles("binance", "BTC/USDT", "1m") == fake.closed_candles("BTC/USDT", "1m", SINCE_MS)
    assert Job.objects.get(pk=job.pk).cursor == LAST_CLOSED
    assert list(Gap.objects.values_list("start_ts", "end_ts")) == [hole]
    # Guesses after a short page or the hole were dropped and asked again: more requests than pages.
    assert len(fake.klines_requests) > result.pages
