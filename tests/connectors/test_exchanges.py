"""The ccxt client and error handling, with the real ccxt library against the fake Binance server.

Waits here are real but short (a 0.3 s client timeout, a 1 s weight window); retry backoff is shortened
through `exchanges.RETRY_POLICY`.
"""

import re
import threading
import urllib.request
from datetime import UTC, datetime, timedelta
from urllib.error import HTTPError

import ccxt
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.connectors import exchanges
from apps.connectors.exchanges import (
    CcxtClient,
    PermanentExchangeError,
    RetryPolicy,
    TransientExchangeError,
    classify,
    get_client,
)
from apps.connectors.models import Connector
from apps.ratelimits.models import RateLimit
from tests.fakes.binance import FakeBinance

NOW_MS = int(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC).timestamp() * 1000)
SINCE = NOW_MS - 3 * 3_600_000


@pytest.fixture(autouse=True)
def policy(monkeypatch) -> RetryPolicy:
    policy = RetryPolicy(attempts=4, initial_seconds=0, max_seconds=0, circuit_threshold=50)
    monkeypatch.setattr(exchanges, "RETRY_POLICY", policy)
    exchanges.clear_clients()
    yield policy
    exchanges.clear_clients()


@pytest.fixture
def fake():
    server = FakeBinance({"BTC/USDT": NOW_MS - 86_400_000, "ETH/USDT": NOW_MS - 86_400_000}, now_ms=NOW_MS).start()
    yield server
    server.stop()


@pytest.fixture
def connector(db, fake) -> Connector:
    return Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=300))


@pytest.fixture
def client(connector) -> CcxtClient:
    return get_client(connector)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ccxt.RequestTimeout("t"), "retry"),
        (ccxt.ExchangeNotAvailable("503"), "retry"),
        (ccxt.DDoSProtection("429"), "retry"),
        (ccxt.RateLimitExceeded("-1003"), "retry"),
        (ccxt.NetworkError("reset"), "retry"),
        (ccxt.OnMaintenance("m"), "retry"),
        (ccxt.BadResponse("garbage"), "retry"),
        (ccxt.BadSymbol("x"), "permanent"),
        (ccxt.BadRequest("x"), "permanent"),
        (ccxt.AuthenticationError("x"), "permanent"),
        (ccxt.PermissionDenied("x"), "permanent"),
        (ccxt.NotSupported("x"), "permanent"),
        (ccxt.InvalidOrder("x"), "permanent"),
        (ccxt.ExchangeError("unmapped code"), "later"),
    ],
)
def test_ccxt_errors_are_classified_transient_or_permanent(error, kind):
    classified = classify("binance", error)
    expected = {
        "retry": exchanges._Retryable,
        "permanent": PermanentExchangeError,
        "later": TransientExchangeError,
    }[kind]
    assert type(classified) is expected
    assert str(classified).startswith("binance: ")  # the operator sees which exchange and what happened


def test_a_bad_symbol_message_tells_the_operator_what_to_check():
    message = str(classify("binance", ccxt.BadSymbol("binance does not have market symbol FOO/BAR")))
    assert "does not list this symbol" in message
    assert "FOO/BAR" in message


def test_connector_options_reach_ccxt_as_they_are_and_its_throttle_is_off(db, fake):
    options = fake.ccxt_options(timeout=1234, options={"fetchMarkets": {"types": ["spot", "linear"]}})
    connector = Connector.objects.create(exchange_id="binance", options=options)
    exchange = get_client(connector).exchange
    assert exchange.urls["api"]["public"] == f"{fake.url}/api/v3"
    assert exchange.urls["api"]["sapi"].startswith("https://api.binance.com")  # untouched keys keep ccxt's
    assert exchange.timeout == 1234
    assert exchange.options["fetchMarkets"]["types"] == ["spot", "linear"]  # the connector wins
    assert exchange.enableRateLimit is False


def test_binance_markets_are_spot_only_unless_configured(client, fake):
    assert client.markets() == ["BTC/USDT", "ETH/USDT"]
    assert fake.counts["requests"] == 1  # exchangeInfo only: no fapi, dapi or sapi calls
    assert "1m" in client.timeframes()
    assert client.markets() == ["BTC/USDT", "ETH/USDT"]
    assert fake.counts["requests"] == 1  # loaded once per client


def test_binance_server_time_page_size_and_weight(client, fake):
    assert client.server_time_ms() == NOW_MS
    assert client.page_limit() == 1000
    assert client.request_weight("1m", 1000) == 2  # GET /api/v3/klines weighs 2 whatever the limit
    rows = client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 1000)
    assert rows == [*fake.closed_candles("BTC/USDT", "1m", SINCE), rows[-1]]  # and the forming candle
    assert fake.counts["weight"] == 1 + 20 + 2
    assert RateLimit.objects.get(exchange_id="binance").tokens_used == 1 + 20 + 2


def test_api_keys_come_from_the_environment_variables_the_connector_names(db, fake, monkeypatch, settings):
    settings.CREDENTIAL_HOSTS_ALLOWED = ["127.0.0.1"]  # the fake's host (tests/connectors/test_secrets.py)
    monkeypatch.setenv("TEST_BINANCE_KEY", "key-from-env")
    monkeypatch.setenv("TEST_BINANCE_SECRET", "secret-from-env")
    connector = Connector.objects.create(
        exchange_id="binance",
        options=fake.ccxt_options(),
        api_key_env="TEST_BINANCE_KEY",
        api_secret_env="TEST_BINANCE_SECRET",
    )
    exchange = get_client(connector).exchange
    assert (exchange.apiKey, exchange.secret) == ("key-from-env", "secret-from-env")


def test_server_errors_and_timeouts_are_retried(client, fake):
    fake.faults.timeout_seconds = 1.0
    fake.script.extend(["server_error", "timeout", "server_error"])
    rows = client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    assert len(rows) == 10
    assert client.stats.failures == 3
    assert RateLimit.objects.get(exchange_id="binance").circuit_failures == 0  # the success reset it


def test_exhausted_retries_raise_a_transient_error(client, fake):
    fake.script.extend(["server_error"] * 4)
    with pytest.raises(TransientExchangeError, match="unavailable") as caught:
        client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    assert not isinstance(caught.value, exchanges._Retryable)
    assert len(fake.klines_requests) == 4


def test_an_exchange_rejection_is_permanent_and_not_retried(client, fake):
    with pytest.raises(PermanentExchangeError, match="rejected the request"):
        client.fetch_ohlcv("BTC/USDT", "1M", SINCE, 10)  # ccxt knows 1M, this server does not: -1120
    assert fake.counts["requests"] == 2  # exchangeInfo, one klines


def test_repeated_failures_open_the_shared_circuit(client, fake, policy):
    policy.circuit_threshold = 3
    policy.circuit_cooldown_seconds = 30
    fake.script.extend(["server_error"] * 10)
    with pytest.raises(TransientExchangeError, match="circuit open"):
        client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    assert len(fake.klines_requests) == 3
    assert RateLimit.objects.get(exchange_id="binance").circuit_open_until is not None

    # Every worker stops: another client of the same exchange sends nothing while the circuit is open
    # (with one attempt allowed it says so at once instead of waiting for the cooldown).
    policy.attempts = 1
    exchanges.clear_clients()
    other = get_client(Connector.objects.get(exchange_id="binance"))
    with pytest.raises(TransientExchangeError, match="circuit open") as caught:
        other.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    assert caught.value.retry_after > 25
    assert len(fake.klines_requests) == 3


@pytest.mark.django_db
def test_a_429_pauses_the_shared_bucket_until_retry_after(fake, policy, monkeypatch):
    policy.max_seconds = 5
    # A 1 s weight window keeps the test short; the used-weight header would otherwise (rightly) pause
    # the bucket until the next clock minute, as Binance's windows are clock minutes.
    fake.window_seconds = 1.0
    monkeypatch.setattr(exchanges._Guard, "_observe", lambda self, headers: None)
    connector = Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=2000))
    client = get_client(connector)
    client.markets()
    fake.use_weight(fake.weight_limit)  # someone else used this window's weight
    rows = client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)

    assert len(rows) == 10
    assert client.stats.rate_limited >= 1
    assert fake.counts["429"] >= 1
    assert fake.counts["418"] == 0  # Retry-After was honoured by every retry
    assert RateLimit.objects.get(exchange_id="binance").blocked_until is not None


@pytest.mark.django_db
def test_the_used_weight_header_drains_the_shared_bucket(client, fake):
    client.markets()
    fake.use_weight(5970)  # someone else on this IP: the exchange will report about 5,992 of 6,000 used
    client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    # Binance counts per calendar minute, and so does its shared limit: what it can still grant this
    # window is at most what the exchange still allows (28 if its minute turned between the two requests).
    row = RateLimit.objects.get(exchange_id="binance")
    assert row.window_seconds == 60
    assert row.limit - row.window_used <= 28


def test_the_fake_server_bans_a_client_that_ignores_retry_after(fake):
    fake.weight_limit = 1
    url = f"{fake.url}/api/v3/time"
    urllib.request.urlopen(url, timeout=2)
    answers = []
    for _ in range(2):
        with pytest.raises(HTTPError) as caught:
            urllib.request.urlopen(url, timeout=2)
        answers.append((caught.value.code, bool(caught.value.headers["Retry-After"])))
    assert answers == [(429, True), (418, True)]


@pytest.mark.parametrize("code", [-1000, -1001, -1007, -1008])
def test_binance_5xx_error_bodies_are_retried_whatever_ccxt_maps_their_code_to(client, fake, code):
    fake.faults.binance_codes = (code,)
    fake.script.extend(["binance_error", "binance_error"])
    rows = client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    assert len(rows) == 10
    assert (client.stats.failures, fake.counts["binance_error"]) == (2, 2)


def test_the_http_5xx_status_wins_over_a_permanent_class_ccxt_picked():
    # ccxt 4.5.90 maps Binance's -1000 to OperationFailed and a 4xx-style body could map to BadRequest.
    answer = exchanges.Answer.from_body(503, '{"code":-1121,"msg":"Invalid symbol."}')
    assert type(classify("binance", ccxt.BadRequest("x"), answer=answer)) is exchanges._Retryable
    overloaded = exchanges.Answer.from_body(200, '{"code":-1008,"msg":"Server is currently overloaded"}')
    assert type(classify("binance", ccxt.ExchangeError("unmapped"), answer=overloaded)) is exchanges._Retryable
    invalid = exchanges.Answer.from_body(400, '{"code":-1121,"msg":"Invalid symbol."}')
    assert type(classify("binance", ccxt.BadSymbol("x"), answer=invalid)) is PermanentExchangeError


def test_connection_resets_and_truncated_bodies_are_retried(client, fake):
    fake.script.extend(["reset", "truncated", "reset"])
    assert len(client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)) == 10
    assert client.stats.failures == 3


class FakeClock:
    """The guard's clock and sleep: retries wait without sleeping for real."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.on_sleep = lambda seconds: None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.on_sleep(seconds)


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(exchanges._Guard, "clock", staticmethod(clock.clock))
    monkeypatch.setattr(exchanges._Guard, "sleep", staticmethod(clock.sleep))
    return clock


def test_retries_go_on_with_capped_backoff_until_no_answer_came_for_the_configured_time(
    client, fake, policy, fake_clock
):
    policy.attempts, policy.initial_seconds, policy.max_seconds, policy.no_progress_seconds = None, 1, 20, 600
    policy.circuit_threshold = 1000
    fake.faults.binance_codes = (-1008,)
    fake.script.extend(["binance_error", "truncated", "binance_error"] * 100)
    with pytest.raises(exchanges.NoProgress) as caught:
        client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    message = str(caught.value)
    # It stops when the next wait would pass the 600 s.
    assert 570 < int(re.match(r"binance: no answer for (\d+) s: ", message).group(1)) <= 600
    assert "x HTTP 503 -1008 Server is currently overloaded with other requests," in message
    assert "x truncated body" in message
    assert max(fake_clock.slept) <= 20  # capped
    assert len(set(fake_clock.slept)) > len(fake_clock.slept) // 2  # jittered
    assert len(fake.klines_requests) > 30


def test_a_request_answered_after_many_failures_is_not_a_failure(client, fake, policy, fake_clock):
    policy.attempts, policy.initial_seconds, policy.max_seconds = None, 1, 20
    fake.script.extend(["server_error"] * 20)
    assert len(client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)) == 10
    assert fake_clock.now < 600


def test_an_open_circuit_is_waited_out_then_one_trial_closes_it_after_three_successes(client, fake, policy, fake_clock):
    policy.attempts, policy.circuit_threshold, policy.circuit_cooldown_seconds = None, 3, 30

    # The database clock cannot be frozen: a sleep of the guard makes the cooldown have passed.
    def cooldown_passes(seconds: float) -> None:
        if seconds >= 1:
            RateLimit.objects.filter(circuit_open_until__gt=timezone.now()).update(circuit_open_until=timezone.now())

    fake_clock.on_sleep = cooldown_passes
    fake.script.extend(["server_error"] * 3)
    assert len(client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)) == 10
    assert round(max(fake_clock.slept)) == 30  # the open circuit's cooldown was waited out
    row = RateLimit.objects.get(exchange_id="binance")
    assert row.circuit_open_until is not None  # half-open ...
    assert row.circuit_successes == 1  # ... after one trial succeeded
    for _ in range(2):
        client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    row = RateLimit.objects.get(exchange_id="binance")
    assert (row.circuit_open_until, row.circuit_failures, row.circuit_successes) == (None, 0, 0)


def test_the_raw_klines_path_returns_what_ccxts_fetch_ohlcv_returns(client, fake):
    raw = client.fetch_ohlcv("BTC/USDT", "1h", SINCE, 5)
    generic = client.exchange.fetch_ohlcv("BTC/USDT", "1h", since=SINCE, limit=5)
    assert raw == generic
    assert all(type(row[0]) is int for row in raw)


def test_the_announced_weight_limit_caps_the_bucket_and_is_logged_once(db, fake, caplog):
    fake.weight_limit = 300
    connector = Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=300))
    assert connector.rate_limit_weight_per_minute == 5400  # collector.yaml's default for binance
    client = get_client(connector)
    client.markets()
    row = RateLimit.objects.get(exchange_id="binance")
    assert row.announced_weight_per_minute == 300
    assert row.capped
    # Burst plus a minute of refill within 95% of the announced 300.
    assert row.capacity + row.refill_per_second * 60 <= 285.0001
    assert (row.configured_capacity, row.configured_weight_per_minute) == (300, 5400)
    assert client._guard.weight_limit_per_minute == 300  # the used-weight header is measured against it
    exchanges.clear_clients()
    get_client(connector).markets()
    assert sum("capped" in record.getMessage() for record in caplog.records) == 1
    # Saving the connector again keeps the cap.
    connector.save()
    assert RateLimit.objects.get(exchange_id="binance").capped


def test_an_announced_limit_above_the_configured_one_changes_nothing(client, fake):
    client.markets()
    row = RateLimit.objects.get(exchange_id="binance")
    assert (row.announced_weight_per_minute, row.capped, row.capacity, row.refill_per_second) == (6000, False, 300, 90)


@pytest.mark.django_db(transaction=True)  # the threads' own connections must see the connector's bucket
def test_threads_share_one_markets_load_and_its_parsed_markets(fake):
    connector = Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=300))
    fake.latency = 0.2  # every thread asks while the first load is still on its way
    barrier = threading.Barrier(8)
    clients: list[CcxtClient] = []

    def work() -> None:
        client = get_client(connector)  # one client per thread, as the scheduler's workers have
        clients.append(client)
        barrier.wait()
        try:
            client.markets()
        finally:
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.counts["requests"] == 1  # one exchangeInfo for the process, not one per thread
    assert len({id(client) for client in clients}) == 8
    assert all(client.exchange.markets is clients[0].exchange.markets for client in clients)  # not re-parsed


def test_stale_markets_serve_while_another_thread_reloads_them(connector, fake, monkeypatch):
    client = get_client(connector)
    client.markets()
    monkeypatch.setattr(exchanges, "MARKETS_TTL_SECONDS", 0.0)  # everything loaded is stale now
    loading = exchanges._markets_loading[client._markets_key]
    assert loading.acquire(blocking=False)  # as another thread reloading would hold it
    try:
        assert client.markets() == ["BTC/USDT", "ETH/USDT"]
        assert fake.counts["requests"] == 1  # no second load, and no wait for the other thread's
    finally:
        loading.release()
    client.markets()
    assert fake.counts["requests"] == 2  # once nobody else is loading, the stale markets are reloaded


def test_a_healthy_circuit_is_read_once_a_second_per_process(client, fake):
    client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)  # markets, clock, bucket created
    with CaptureQueriesContext(connection) as queries:
        for _ in range(5):
            client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    circuit_reads = [q for q in queries.captured_queries if '"circuit_open_until" FROM' in q["sql"]]
    assert len(circuit_reads) <= 1
    assert len(fake.klines_requests) == 6


def test_a_circuit_opened_by_another_process_stops_requests_after_the_wait_it_causes(client, fake, policy):
    client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)  # this process now remembers the circuit as healthy
    # Another process opens the circuit: this one's bucket refuses tokens until it ends, and the request
    # that waited for them looks at the circuit again before it is sent.
    policy.attempts = 1
    RateLimit.objects.filter(exchange_id="binance").update(
        circuit_failures=5,
        circuit_open_until=timezone.now() + timedelta(seconds=0.3),
        circuit_trial_until=timezone.now() + timedelta(seconds=60),
    )
    with pytest.raises(TransientExchangeError, match="half-open"):
        client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    assert len(fake.klines_requests) == 1  # another worker holds the half-open circuit's one trial
