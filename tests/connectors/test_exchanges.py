"""The ccxt client and error handling, with the real ccxt library against the fake Binance server.

Waits here are real but short (a 0.3 s client timeout, a 1 s weight window); retry backoff is shortened
through `exchanges.RETRY_POLICY`.
"""

import urllib.request
from datetime import UTC, datetime
from urllib.error import HTTPError

import ccxt
import pytest

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
    with pytest.raises(TransientExchangeError, match="circuit opened"):
        client.fetch_ohlcv("BTC/USDT", "1m", SINCE, 10)
    assert len(fake.klines_requests) == 3
    assert RateLimit.objects.get(exchange_id="binance").circuit_open_until is not None

    # Every worker stops: another client of the same exchange fails fast without a request.
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
    # At most what the exchange still allows (28 if its minute turned between the two requests).
    assert RateLimit.objects.get(exchange_id="binance").tokens <= 28


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
