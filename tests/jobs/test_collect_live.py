"""Live runs of a collection job: the next candles after the cursor, with the real ccxt against the fake
Binance. A run that only appends records no gap, and still finds a hole in what it appends."""

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.connectors import exchanges
from apps.connectors.models import Connector
from apps.jobs import collect
from apps.jobs.collect import collect_job
from apps.jobs.models import Job
from apps.marketdata import store
from apps.marketdata.models import Gap
from apps.marketdata.timeframes import datetime_to_ms
from tests.fakes.binance import FakeBinance

NOW_MS = datetime_to_ms(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC))
MINUTE = 60_000
LAST_CLOSED = NOW_MS // MINUTE * MINUTE - MINUTE


def noop() -> None:
    pass


@pytest.fixture(autouse=True)
def fresh_clients():
    exchanges.clear_clients()
    yield
    exchanges.clear_clients()


@pytest.fixture
def fake():
    with FakeBinance({"BTC/USDT": NOW_MS - 86_400_000}, now_ms=NOW_MS) as server:
        yield server


@pytest.fixture
def job(db, settings, fake) -> Job:
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    connector = Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=2000))
    return Job.objects.create(connector=connector, symbol="BTC/USDT", timeframe="1m", cursor=LAST_CLOSED - 3 * MINUTE)


def test_a_run_appending_the_next_candles_records_no_gap_and_counts_an_older_open_one(job, fake):
    old = Gap.objects.create(
        exchange_id="binance",
        symbol="BTC/USDT",
        timeframe="1m",
        start_ts=LAST_CLOSED - 60 * MINUTE,
        end_ts=LAST_CLOSED - 59 * MINUTE,
        missing=2,
    )
    fake.holes = {("BTCUSDT", "1m"): [(old.start_ts, old.end_ts)]}  # still missing at the exchange
    result = collect_job(job, None, noop)

    assert [row[0] for row in store.read_candles("binance", "BTC/USDT", "1m")] == [
        LAST_CLOSED - 2 * MINUTE,
        LAST_CLOSED - MINUTE,
        LAST_CLOSED,
    ]
    assert result.gaps_open == 1
    assert list(Gap.objects.values_list("start_ts", flat=True)) == [old.start_ts]


def test_a_hole_in_the_appended_candles_is_still_a_gap(job, fake):
    fake.holes = {("BTCUSDT", "1m"): [(LAST_CLOSED - MINUTE, LAST_CLOSED - MINUTE)]}
    result = collect_job(job, None, noop)

    gap = Gap.objects.get()
    assert (gap.start_ts, gap.end_ts) == (LAST_CLOSED - MINUTE, LAST_CLOSED - MINUTE)
    assert result.gaps_open == 1


def test_a_run_with_nothing_to_fetch_and_no_gaps_counts_none(job, fake):
    job.cursor = LAST_CLOSED
    result = collect_job(job, None, noop)
    assert (result.pages, result.gaps_open) == (0, 0)


def test_appending_runs_ask_for_open_gaps_again_only_after_the_recheck_interval(job, fake, monkeypatch):
    def gap_queries() -> int:
        with CaptureQueriesContext(connection) as queries:
            collect_job(job, None, noop)
        return sum('"marketdata_gap"' in query["sql"] for query in queries.captured_queries)

    assert gap_queries() == 1  # first run: no series found without gaps yet
    # A gap recorded by someone else meanwhile (a backfill, the admin).
    Gap.objects.create(
        exchange_id="binance",
        symbol="BTC/USDT",
        timeframe="1m",
        start_ts=LAST_CLOSED - 60 * MINUTE,
        end_ts=LAST_CLOSED - 60 * MINUTE,
        missing=1,
    )
    exchanges.clear_clients()  # forget the exchange clock this process keeps
    fake.fixed_now_ms += MINUTE
    assert gap_queries() == 0  # appended one candle: the gap check is skipped within the interval
    monkeypatch.setattr(collect, "GAPS_RECHECK_SECONDS", 0.0)
    exchanges.clear_clients()
    fake.fixed_now_ms += MINUTE
    assert gap_queries() >= 1  # after it: asked again, and the gap is refetched
    assert not Gap.objects.exists()  # refetched: the exchange has those candles
