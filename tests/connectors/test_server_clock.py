"""The exchange's clock as the ccxt client keeps it: one time request, then an offset, with the real ccxt
library against the fake Binance server."""

from datetime import UTC, datetime

import pytest

from apps.connectors import exchanges
from apps.connectors.exchanges import get_client
from apps.connectors.models import Connector
from tests.fakes.binance import FakeBinance

MINUTE = 60_000
PAST_MS = int(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(autouse=True)
def _fresh_clients():
    exchanges.clear_clients()
    yield
    exchanges.clear_clients()


def _client(fake: FakeBinance):
    return get_client(Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=2000)))


@pytest.mark.django_db
def test_server_time_is_asked_once_then_kept_as_an_offset_that_never_runs_ahead():
    with FakeBinance({"BTC/USDT": 0}) as fake:  # the fake on the real clock, like the exchange
        client = _client(fake)
        first = client.server_time_ms()
        requests = fake.counts["requests"]
        later = [client.server_time_ms() for _ in range(5)]
        after = fake.now_ms()

    assert fake.counts["requests"] == requests  # no request after the first
    assert first <= later[0] <= later[-1]
    # A candle counts as closed by this clock only when the exchange's own clock says so too.
    assert later[-1] <= after


@pytest.mark.django_db
def test_the_threads_of_a_process_share_one_measured_offset():
    with FakeBinance({"BTC/USDT": 0}) as fake:
        connector = Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=2000))
        get_client(connector).server_time_ms()
        requests = fake.counts["requests"]
        exchanges._local.__dict__.pop("clients")  # another thread's client: same connector, new instance
        get_client(connector).server_time_ms()

    assert fake.counts["requests"] == requests


@pytest.mark.django_db
def test_the_offset_is_measured_again_after_its_ttl(monkeypatch):
    with FakeBinance({"BTC/USDT": 0}, now_ms=PAST_MS) as fake:
        client = _client(fake)
        assert client.server_time_ms() == PAST_MS
        fake.fixed_now_ms = PAST_MS + 30 * MINUTE
        monkeypatch.setattr(exchanges, "SERVER_CLOCK_TTL_SECONDS", 0.0)
        assert client.server_time_ms() == PAST_MS + 30 * MINUTE


@pytest.mark.django_db
def test_a_date_header_far_from_the_kept_clock_makes_the_next_run_ask_again():
    # The fake's clock is frozen in the past while its Date headers follow the real clock: to the
    # client that is the exchange's clock jumping. The next reading asks the exchange again.
    with FakeBinance({"BTC/USDT": PAST_MS - 86_400_000}, now_ms=PAST_MS) as fake:
        client = _client(fake)
        assert client.server_time_ms() == PAST_MS
        client.fetch_ohlcv("BTC/USDT", "1m", PAST_MS - 10 * MINUTE, 5)
        fake.fixed_now_ms = PAST_MS + 30 * MINUTE
        assert client.server_time_ms() == PAST_MS + 30 * MINUTE


@pytest.mark.django_db
def test_a_date_header_that_agrees_keeps_the_offset():
    with FakeBinance({"BTC/USDT": 0}) as fake:
        client = _client(fake)
        client.server_time_ms()
        client.fetch_ohlcv("BTC/USDT", "1m", fake.now_ms() - 10 * MINUTE, 5)
        requests = fake.counts["requests"]
        client.server_time_ms()

    assert fake.counts["requests"] == requests
