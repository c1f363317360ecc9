"""Collection of one job (`apps.jobs.collect.collect_job`): paging, closed candles, cursor, gaps.

The simulated exchange with a frozen clock for paging and the cursor; the fake Binance server (real
ccxt over HTTP) for what only a misbehaving exchange does: holes, short, empty and truncated pages.
"""

import threading
from datetime import UTC, datetime

import pytest
import time_machine

from apps.connectors import exchanges
from apps.connectors.exchanges import PermanentExchangeError, SimulatedClient
from apps.connectors.models import Connector
from apps.jobs.collect import CollectionFailed, clean_rows, collect_job
from apps.jobs.models import Job
from apps.marketdata import store
from apps.marketdata.models import Gap
from apps.marketdata.timeframes import datetime_to_ms
from tests.fakes.binance import FakeBinance, Faults

NOW = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC)
NOW_MS = datetime_to_ms(NOW)
MINUTE = 60_000
LAST_CLOSED_1M = NOW_MS // MINUTE * MINUTE - MINUTE  # 11:59 opens, closes at 12:00 <= 12:00:30


def noop() -> None:
    pass


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    # No real sleeps between retries in these tests; the policy itself is tested in test_exchanges.
    monkeypatch.setattr(exchanges, "RETRY_POLICY", exchanges.RetryPolicy(initial_seconds=0, max_seconds=0))
    exchanges.clear_clients()
    yield
    exchanges.clear_clients()


@pytest.fixture
def sql(settings):
    settings.MONGODB_URI = ""
    store.reset_mongo_client()


@pytest.fixture
def frozen():
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def simulated(db, sql) -> Connector:
    return Connector.objects.create(exchange_id="simulated")


def make_job(connector: Connector, since: datetime | None = None, symbol="BTC/USDT", timeframe="1m") -> Job:
    return Job.objects.create(connector=connector, symbol=symbol, timeframe=timeframe, since=since)


def stored(job: Job) -> list[list[float]]:
    return store.read_candles(job.exchange_id, job.symbol, job.timeframe)


def test_clean_rows_keeps_the_asked_range_sorted_and_unique():
    raw = [[300, 1, 2, 0.5, 1.5, 10], [100, 1, 2, 0.5, 1.5, 10], [200, 1, 2, 0.5, 1.5, 10], [100, 2, 3, 1, 2, 5]]
    raw += [[400, 1, 2, 0.5, 1.5, 10], [250, None, 2, 1, 1, 1], [260, 1, 2, 1, float("nan"), 1], ["x"]]
    rows, dropped = clean_rows(raw, 100, 300)
    assert [row[0] for row in rows] == [100, 200, 300]
    assert rows[0] == [100, 2.0, 3.0, 1.0, 2.0, 5.0]  # the last duplicate wins
    assert dropped == 5  # 400 out of range, a duplicate, None, NaN, an unreadable row


def test_collects_from_since_to_the_last_closed_candle_exactly(simulated, frozen):
    job = make_job(simulated, since=datetime(2024, 3, 1, 9, 0, tzinfo=UTC))
    result = collect_job(job, None, noop)

    rows = stored(job)
    expected_ts = list(range(datetime_to_ms(job.since), LAST_CLOSED_1M + 1, MINUTE))
    assert [row[0] for row in rows] == expected_ts  # across page boundaries: none missing or duplicated
    assert rows[-1][0] + MINUTE <= NOW_MS  # the forming candle is never stored
    assert result.candles_written == len(expected_ts)
    job.refresh_from_db()
    assert job.cursor == LAST_CLOSED_1M
    client = SimulatedClient()
    assert rows[100] == client.candle("BTC/USDT", "1m", rows[100][0])  # stored as the exchange sent it


def test_pages_follow_each_other_without_overlap(simulated, frozen, monkeypatch):
    monkeypatch.setattr(SimulatedClient, "page_limit", lambda self: 7)
    job = make_job(simulated, since=datetime(2024, 3, 1, 11, 0, tzinfo=UTC))
    asked = []
    original = SimulatedClient._klines

    def spy(self, symbol, timeframe, since_ms, limit):
        asked.append((since_ms, limit))
        return original(self, symbol, timeframe, since_ms, limit)

    monkeypatch.setattr(SimulatedClient, "_klines", spy)
    collect_job(job, None, noop)

    assert len(stored(job)) == 60
    assert [since for since, _ in asked] == [datetime_to_ms(job.since) + i * 7 * MINUTE for i in range(9)]
    assert asked[-1][1] == 5  # 4 slots left: the last page asks for what is left (and one slot more), not a full page


def test_a_second_run_continues_after_the_cursor_and_writes_nothing_twice(simulated):
    job = make_job(simulated, since=datetime(2024, 3, 1, 11, 0, tzinfo=UTC))
    with time_machine.travel(NOW, tick=False):
        first = collect_job(job, None, noop)
    with time_machine.travel(datetime(2024, 3, 1, 12, 10, 30, tzinfo=UTC), tick=False):
        second = collect_job(job, None, noop)
        again = collect_job(job, None, noop)

    assert first.candles_written == 60
    assert second.candles_written == 10
    assert again.candles_written == 0
    assert again.candles_fetched == 0
    assert [row[0] for row in stored(job)] == list(
        range(datetime_to_ms(job.since), LAST_CLOSED_1M + 10 * MINUTE + 1, MINUTE)
    )


def test_without_since_a_new_job_starts_the_configured_number_of_candles_back(simulated, frozen):
    job = make_job(simulated, timeframe="1h")
    collect_job(job, None, noop)
    rows = stored(job)
    assert len(rows) == 1000
    assert rows[-1][0] == datetime(2024, 3, 1, 11, 0, tzinfo=UTC).timestamp() * 1000


def test_history_before_the_listing_is_not_a_gap(simulated, frozen):
    job = make_job(simulated, symbol="SOL/USDT", timeframe="1d", since=datetime(2020, 1, 1, tzinfo=UTC))
    result = collect_job(job, None, noop)
    assert stored(job)[0][0] == datetime_to_ms(datetime(2020, 8, 11, tzinfo=UTC))
    assert result.gaps_open == 0


def test_the_page_budget_ends_a_run_with_more_to_do(simulated, frozen):
    job = make_job(simulated, since=datetime(2024, 2, 28, tzinfo=UTC))
    result = collect_job(job, None, noop, max_pages=2)
    assert result.more
    assert result.candles_written == 2000
    job.refresh_from_db()
    assert job.cursor == datetime_to_ms(job.since) + 1999 * MINUTE


def test_a_stop_request_ends_the_run_after_the_current_page(simulated, frozen):
    job = make_job(simulated, since=datetime(2024, 2, 28, tzinfo=UTC))
    stop = threading.Event()
    pages = []

    def progress(slots, written):
        pages.append(written)
        stop.set()

    result = collect_job(job, None, noop, progress=progress, stop=stop)
    assert result.stopped
    assert pages == [1000]
    job.refresh_from_db()
    assert job.cursor == datetime_to_ms(job.since) + 999 * MINUTE


def test_until_is_exclusive(simulated, frozen):
    job = make_job(simulated, since=datetime(2024, 3, 1, 10, 0, tzinfo=UTC))
    collect_job(job, None, noop, until_ms=datetime_to_ms(datetime(2024, 3, 1, 10, 30, tzinfo=UTC)))
    rows = stored(job)
    assert len(rows) == 30
    assert rows[-1][0] == datetime_to_ms(datetime(2024, 3, 1, 10, 29, tzinfo=UTC))


def test_counters_and_heartbeat_follow_the_pages(simulated, frozen):
    job = make_job(simulated, since=datetime(2024, 2, 29, 12, 0, tzinfo=UTC))
    beats = []
    result = collect_job(job, None, lambda: beats.append(1))
    assert result.pages == 2
    assert len(beats) == 2
    assert result.requests == 2  # the simulated clock is local: no time request
    assert result.candles_fetched == 1441  # the forming candle was fetched and dropped
    assert result.dropped == 1


def test_an_unknown_symbol_is_a_permanent_error_naming_it(simulated, frozen):
    job = make_job(simulated, symbol="NOPE/USDT")
    with pytest.raises(CollectionFailed, match="NOPE/USDT") as failed:
        collect_job(job, None, noop)
    assert isinstance(failed.value.error, PermanentExchangeError)
    assert failed.value.__cause__ is failed.value.error


# --- Against the fake Binance (real ccxt over HTTP) ---------------------------------------------------

LISTED = NOW_MS - 2 * 86_400_000


@pytest.fixture
def fake():
    server = FakeBinance({"BTC/USDT": LISTED, "ETH/USDT": LISTED}, now_ms=NOW_MS).start()
    yield server
    server.stop()


@pytest.fixture
def binance(db, sql, fake) -> Connector:
    return Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=2000))


def expected(fake: FakeBinance, job: Job) -> list[list[float]]:
    return fake.closed_candles(job.symbol, job.timeframe, datetime_to_ms(job.since))


def test_binance_collection_matches_the_servers_closed_candles(binance, fake):
    job = make_job(binance, since=datetime(2024, 2, 29, 10, 0, tzinfo=UTC))
    result = collect_job(job, None, noop)
    assert stored(job) == expected(fake, job)
    assert result.requests == 1 + 1 + 2  # exchangeInfo, time, 2 pages of at most 1,000 (1,560 candles)
    assert fake.counts["429"] == 0


def test_short_empty_and_truncated_pages_are_not_the_end_of_the_data(binance, fake):
    fake.faults = Faults(short_page=0.25, empty_page=0.2, truncated=0.2, seed=3)
    job = make_job(binance, since=datetime(2024, 2, 28, 13, 0, tzinfo=UTC))
    result = collect_job(job, None, noop)
    assert fake.counts["short_page"]
    assert fake.counts["empty_page"]
    assert fake.counts["truncated"]
    assert stored(job) == expected(fake, job)
    assert result.gaps_open == 0
    assert not Gap.objects.exists()


def test_holes_in_the_exchanges_data_become_gaps_never_candles(binance, fake):
    hole = (NOW_MS // MINUTE * MINUTE - 300 * MINUTE, NOW_MS // MINUTE * MINUTE - 291 * MINUTE)
    fake.holes = {("BTCUSDT", "1m"): [hole]}
    job = make_job(binance, since=datetime(2024, 3, 1, 0, 0, tzinfo=UTC))
    result = collect_job(job, None, noop)

    assert stored(job) == expected(fake, job)
    gap = Gap.objects.get()
    assert (gap.start_ts, gap.end_ts, gap.missing, gap.status) == (*hole, 10, Gap.Status.OPEN)
    assert gap.attempts == 1  # refetched once in the same run, empty
    assert result.gaps_open == 1

    for _ in range(2):
        collect_job(job, None, noop)
    gap.refresh_from_db()
    assert gap.status == Gap.Status.CONFIRMED_EMPTY  # not refetched forever
    requests_before = len(fake.klines_requests)
    collect_job(job, None, noop)
    assert len(fake.klines_requests) == requests_before  # nothing new, no refetch


def test_a_gap_the_exchange_fills_later_is_stored_and_closed(binance, fake):
    hole = (NOW_MS // MINUTE * MINUTE - 100 * MINUTE, NOW_MS // MINUTE * MINUTE - 95 * MINUTE)
    fake.holes = {("BTCUSDT", "1m"): [hole]}
    job = make_job(binance, since=datetime(2024, 3, 1, 0, 0, tzinfo=UTC))
    collect_job(job, None, noop)
    assert Gap.objects.count() == 1

    fake.holes = {}
    collect_job(job, None, noop)
    assert stored(job) == expected(fake, job)
    assert not Gap.objects.exists()


def test_an_unlisted_binance_symbol_fails_permanently(binance, fake):
    job = make_job(binance, symbol="XRP/USDT")
    with pytest.raises(CollectionFailed, match="XRP/USDT") as failed:
        collect_job(job, None, noop)
    assert isinstance(failed.value.error, PermanentExchangeError)


def test_a_scheduler_claim_collects_and_records_its_run(simulated, frozen):
    job = make_job(simulated, since=datetime(2024, 3, 1, 10, 0, tzinfo=UTC))
    (run,) = Job.objects.claim("test-worker", limit=1, lease_seconds=60)
    result = collect_job(run.job, run, run.heartbeat(60))
    run.succeed(result, delay_seconds=2)

    run.refresh_from_db()
    assert (run.status, run.candles_written, run.requests) == ("success", 120, 1)
    job.refresh_from_db()
    assert job.cursor == LAST_CLOSED_1M
    assert job.lease_owner == ""
