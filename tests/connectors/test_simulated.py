"""The offline `simulated` exchange: deterministic, plausible candles with no network."""

import itertools
from datetime import UTC, datetime

import pytest
import time_machine

from apps.connectors import exchanges
from apps.connectors.exchanges import (
    SIMULATED_MARKETS,
    SIMULATED_TIMEFRAMES,
    PermanentExchangeError,
    RetryPolicy,
    SimulatedClient,
    TransientExchangeError,
    get_client,
)
from apps.connectors.models import Connector
from apps.marketdata.timeframes import timeframe_ms

NOW = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
MINUTE = 60_000

pytestmark = pytest.mark.django_db  # every request takes its weight from the shared rate limit


@pytest.fixture(autouse=True)
def frozen(monkeypatch):
    monkeypatch.setattr(exchanges, "RETRY_POLICY", RetryPolicy(attempts=3, initial_seconds=0, max_seconds=0))
    with time_machine.travel(NOW, tick=False):
        yield


def test_refetching_any_range_returns_identical_candles():
    client = SimulatedClient()
    first = client.fetch_ohlcv("BTC/USDT", "1m", NOW_MS - 500 * MINUTE, 300)
    again = SimulatedClient().fetch_ohlcv("BTC/USDT", "1m", NOW_MS - 500 * MINUTE, 300)
    assert first == again
    # Pages cut elsewhere agree on the candles they share.
    shifted = client.fetch_ohlcv("BTC/USDT", "1m", NOW_MS - 450 * MINUTE, 10)
    assert shifted == first[50:60]


def test_any_page_of_the_history_is_available_without_the_pages_before_it():
    client = SimulatedClient()
    since = int(datetime(2018, 1, 1, tzinfo=UTC).timestamp() * 1000)
    rows = client.fetch_ohlcv("ETH/USDT", "1m", since, 1000)
    assert len(rows) == 1000
    assert [row[0] for row in rows] == list(range(since, since + 1000 * MINUTE, MINUTE))


def test_candles_are_well_formed_and_continuous():
    rows = SimulatedClient().fetch_ohlcv("BTC/USDT", "5m", NOW_MS - 1000 * 5 * MINUTE, 1000)
    for row in rows:
        ts, open_, high, low, close, volume = row
        assert ts % (5 * MINUTE) == 0
        assert low <= min(open_, close) <= max(open_, close) <= high
        assert volume > 0
    for previous, current in itertools.pairwise(rows):
        # Each candle opens where the previous one closed (up to rounding): a path, not noise.
        assert current[1] == pytest.approx(previous[4], rel=1e-6)


def test_timeframes_agree_with_each_other():
    client = SimulatedClient()
    hour = client.fetch_ohlcv("BTC/USDT", "1h", NOW_MS - 3 * 3_600_000, 1)[0]
    minutes = client.fetch_ohlcv("BTC/USDT", "1m", hour[0], 60)
    assert hour[1] == pytest.approx(minutes[0][1])
    assert hour[4] == pytest.approx(minutes[-1][4])


def test_symbols_and_seeds_give_different_series():
    since = NOW_MS - 100 * MINUTE
    btc = SimulatedClient().fetch_ohlcv("BTC/USDT", "1m", since, 5)
    eth = SimulatedClient().fetch_ohlcv("ETH/USDT", "1m", since, 5)
    other_seed = SimulatedClient({"seed": "other"}).fetch_ohlcv("BTC/USDT", "1m", since, 5)
    assert btc != eth
    assert btc != other_seed


def test_history_starts_at_the_listing_and_ends_with_the_forming_candle():
    client = SimulatedClient()
    listing, _ = SIMULATED_MARKETS["SOL/USDT"]
    rows = client.fetch_ohlcv("SOL/USDT", "1d", 0, 5)
    assert rows[0][0] == listing
    latest = client.fetch_ohlcv("BTC/USDT", "1m", NOW_MS - 5 * MINUTE, 1000)
    assert latest[-1][0] == NOW_MS // MINUTE * MINUTE  # still forming at NOW: collection drops it


def test_markets_and_timeframes():
    client = SimulatedClient()
    assert {"BTC/USDT", "ETH/USDT", "SOL/USDT"} <= set(client.markets())
    assert client.timeframes() == list(SIMULATED_TIMEFRAMES)
    assert all(timeframe_ms(tf) > 0 for tf in client.timeframes())
    assert client.server_time_ms() == NOW_MS


def test_unknown_symbol_and_timeframe_are_permanent_errors():
    client = SimulatedClient()
    with pytest.raises(PermanentExchangeError, match="does not list this symbol"):
        client.fetch_ohlcv("NOPE/USDT", "1m", NOW_MS, 10)
    with pytest.raises(PermanentExchangeError, match="rejected the request"):
        client.fetch_ohlcv("BTC/USDT", "7m", NOW_MS, 10)


def test_failure_rate_injects_transient_failures_that_are_retried():
    always = SimulatedClient({"failure_rate": 1.0})
    with pytest.raises(TransientExchangeError, match="unavailable"):
        always.fetch_ohlcv("BTC/USDT", "1m", NOW_MS - 10 * MINUTE, 5)
    assert always.stats.requests == 3  # every attempt of the retry policy

    exchanges.RETRY_POLICY.attempts = 12  # 0.3 ** 12: a fetch failing outright is not a concern here
    sometimes = SimulatedClient({"failure_rate": 0.3})
    for _ in range(20):
        assert len(sometimes.fetch_ohlcv("BTC/USDT", "1m", NOW_MS - 10 * MINUTE, 5)) == 5


def test_the_connector_options_configure_the_client(db):
    connector = Connector.objects.create(exchange_id="simulated", options={"latency_ms": 20, "failure_rate": 0.05})
    client = get_client(connector)
    assert isinstance(client, SimulatedClient)
    assert (client.latency, client.failure_rate) == (0.02, 0.05)
    assert get_client(connector) is client  # reused within the thread
