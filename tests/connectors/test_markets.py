"""Markets: the refresh (real ccxt against the fake Binance server), the pairs and exchange endpoints, and
the check of a new job's symbol against the stored markets."""

import socket
from datetime import UTC, datetime

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from apps.connectors import exchanges
from apps.connectors.exchanges import RetryPolicy
from apps.connectors.models import Connector, Market
from apps.jobs.models import Job, Task
from apps.jobs.tasks import run_task
from apps.monitoring.models import LiveEvent
from apps.ratelimits.models import RateLimit
from tests.conftest import grant
from tests.fakes.binance import FakeBinance

NOW_MS = int(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC).timestamp() * 1000)
LISTED = NOW_MS - 86_400_000


@pytest.fixture(autouse=True)
def policy(monkeypatch) -> RetryPolicy:
    policy = RetryPolicy(attempts=2, initial_seconds=0, max_seconds=0, circuit_threshold=50)
    monkeypatch.setattr(exchanges, "RETRY_POLICY", policy)
    exchanges.clear_clients()
    yield policy
    exchanges.clear_clients()


@pytest.fixture
def fake():
    server = FakeBinance({"BTC/USDT": LISTED, "ETH/USDT": LISTED, "ETH/BTC": LISTED}, now_ms=NOW_MS).start()
    yield server
    server.stop()


@pytest.fixture
def connector(db, fake) -> Connector:
    return Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=2000))


def _symbols(**filters) -> list[str]:
    return list(Market.objects.filter(exchange_id="binance", **filters).values_list("symbol", flat=True))


@pytest.mark.django_db
def test_a_refresh_stores_every_market_with_one_request_weighed_by_the_shared_bucket(connector, fake):
    result = connector.refresh_markets()

    assert (result.total, result.added, result.updated, result.delisted) == (3, 3, 0, 0)
    assert _symbols() == ["BTC/USDT", "ETH/BTC", "ETH/USDT"]
    btc = Market.objects.get(exchange_id="binance", symbol="BTC/USDT")
    assert (btc.market_id, btc.base, btc.quote, btc.type, btc.active) == ("BTCUSDT", "BTC", "USDT", "spot", True)
    assert btc.precision["price"] == pytest.approx(0.01)
    assert btc.limits["amount"]["min"] == pytest.approx(0.00001)
    # exchangeInfo weighs 20, taken from the exchange's shared bucket before the request left.
    assert fake.counts["requests"] == 1
    assert RateLimit.objects.get(exchange_id="binance").tokens_used == 20


@pytest.mark.django_db
def test_a_delisted_market_is_kept_inactive_and_its_active_jobs_say_so(connector, fake):
    connector.refresh_markets()
    eth = Job.objects.create(connector=connector, symbol="ETH/USDT", timeframe="1m")
    paused = Job.objects.create(connector=connector, symbol="ETH/USDT", timeframe="1h", status=Job.Status.PAUSED)
    del fake.listings["ETHUSDT"]
    fake.listings["SOLUSDT"] = ("SOL/USDT", LISTED)

    result = connector.refresh_markets()

    assert (result.total, result.added, result.updated, result.delisted, result.jobs_stopped) == (3, 1, 0, 1, 1)
    gone = Market.objects.get(exchange_id="binance", symbol="ETH/USDT")
    assert not gone.active
    assert gone.delisted_at is not None
    eth.refresh_from_db()
    assert eth.status == Job.Status.ERROR
    assert "no longer lists this market" in eth.last_error
    paused.refresh_from_db()
    assert paused.status == Job.Status.PAUSED  # the operator's pause stands

    fake.listings["ETHUSDT"] = ("ETH/USDT", LISTED)
    again = connector.refresh_markets()
    assert (again.added, again.relisted, again.delisted) == (0, 1, 0)
    back = Market.objects.get(exchange_id="binance", symbol="ETH/USDT")
    assert back.active
    assert back.delisted_at is None
    assert back.first_seen == gone.first_seen


@pytest.mark.django_db
def test_a_halted_market_is_inactive_and_a_repeated_refresh_changes_nothing(connector, fake):
    connector.refresh_markets()
    job = Job.objects.create(connector=connector, symbol="ETH/BTC", timeframe="1m")
    fake.statuses["ETHBTC"] = "BREAK"

    result = connector.refresh_markets()
    assert (result.updated, result.jobs_stopped) == (1, 1)
    assert _symbols(active=False) == ["ETH/BTC"]
    job.refresh_from_db()
    assert job.status == Job.Status.ERROR
    assert "not trading" in job.last_error

    unchanged = connector.refresh_markets()
    assert (unchanged.added, unchanged.updated, unchanged.delisted, unchanged.jobs_stopped) == (0, 0, 0, 0)


# --- Jobs are checked against the stored markets ---------------------------------------------------------


@pytest.mark.django_db
def test_a_job_on_an_exchange_whose_markets_are_unknown_is_accepted(api_client, connector):
    response = api_client.post(
        "/api/v1/jobs/", {"exchange_id": "binance", "symbol": "FOO/BAR", "timeframe": "1m"}, format="json"
    )
    assert response.status_code == 201, response.json()


@pytest.mark.django_db
def test_an_unlisted_symbol_is_a_400_naming_it_the_exchange_and_the_closest_listed(api_client, connector):
    connector.refresh_markets()

    response = api_client.post(
        "/api/v1/jobs/", {"exchange_id": "binance", "symbol": "BTC/USDC", "timeframe": "1m"}, format="json"
    )

    assert response.status_code == 400
    message = response.json()["symbol"][0]
    assert "'BTC/USDC' is not listed by binance" in message
    assert "Closest listed: BTC/USDT" in message
    assert not Job.objects.exists()


@pytest.mark.django_db
def test_bulk_creation_refuses_every_unlisted_or_delisted_symbol_and_creates_nothing(api_client, connector, fake):
    connector.refresh_markets()
    del fake.listings["ETHBTC"]
    connector.refresh_markets()

    response = api_client.post(
        "/api/v1/jobs/bulk",
        {"exchange_id": "binance", "symbols": ["BTC/USDT", "DOGE/USDT", "ETH/BTC", "nonsense"], "timeframes": ["1m"]},
        format="json",
    )

    assert response.status_code == 400
    messages = response.json()["symbols"]
    assert len(messages) == 3  # nonsense's format, DOGE/USDT unlisted, ETH/BTC delisted
    assert any("'DOGE/USDT' is not listed by binance" in m for m in messages)
    assert any("'ETH/BTC' was delisted on" in m for m in messages)
    assert not Job.objects.exists()


@pytest.mark.django_db
def test_the_model_validation_the_admin_uses_refuses_an_unlisted_symbol(connector):
    connector.refresh_markets()
    with pytest.raises(ValidationError) as caught:
        Job(connector=connector, symbol="ETH/USDC", timeframe="1m").full_clean()
    assert "Closest listed: ETH/USDT" in caught.value.message_dict["symbol"][0]


@pytest.mark.django_db
def test_an_existing_job_whose_market_went_away_stays_editable(connector, fake):
    connector.refresh_markets()
    job = Job.objects.create(connector=connector, symbol="ETH/USDT", timeframe="1m")
    del fake.listings["ETHUSDT"]
    connector.refresh_markets()
    job.refresh_from_db()
    job.full_clean()  # no error: only new jobs are checked


@pytest.mark.django_db
def test_backfill_refuses_an_unlisted_symbol_before_fetching_anything(connector, fake):
    connector.refresh_markets()
    requests = fake.counts["requests"]
    with pytest.raises(CommandError, match=r"--symbol: Symbol 'BTC/USDC' is not listed by binance.*BTC/USDT"):
        call_command(
            "backfill", "--exchange", "binance", "--symbol", "BTC/USDC", "--timeframe", "1m", "--since", "2024-02-01"
        )
    assert fake.counts["requests"] == requests


# --- Refresh: API, admin, on creation ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_refresh_endpoint_answers_what_changed(api_client, connector):
    response = api_client.post(f"/api/v1/connectors/{connector.pk}/refresh")
    assert response.status_code == 200
    assert response.json() == {
        "exchange_id": "binance",
        "total": 3,
        "added": 3,
        "updated": 0,
        "delisted": 0,
        "relisted": 0,
        "jobs_stopped": 0,
    }


@pytest.mark.django_db
def test_the_refresh_endpoint_needs_the_change_permission(connector):
    reader = grant(get_user_model().objects.create_user("reader"), "view_connector")
    client = APIClient()
    client.force_authenticate(reader)
    assert client.post(f"/api/v1/connectors/{connector.pk}/refresh").status_code == 403
    assert not Market.objects.exists()


@pytest.mark.django_db
def test_a_refresh_the_exchange_does_not_answer_is_a_503_and_changes_nothing(api_client, connector, fake):
    connector.refresh_markets()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    connector.options = {"urls": {"api": {"public": f"http://127.0.0.1:{port}/api/v3"}}, "timeout": 2000}
    connector.save()  # nothing listens there: every attempt is refused

    response = api_client.post(f"/api/v1/connectors/{connector.pk}/refresh")
    assert response.status_code == 503
    assert response.json()["detail"].startswith("Markets not refreshed: binance:")
    assert _symbols(active=True) == ["BTC/USDT", "ETH/BTC", "ETH/USDT"]


@pytest.mark.django_db
def test_creating_a_connector_queues_its_markets_for_a_worker(api_client, fake):
    response = api_client.post(
        "/api/v1/connectors/", {"exchange_id": "binance", "options": fake.ccxt_options(timeout=2000)}, format="json"
    )
    assert response.status_code == 201
    assert fake.counts["requests"] == 0  # the web request did not wait for the exchange
    task = Task.objects.get(kind=Task.Kind.MARKETS)
    assert task.params == {"connector": response.json()["id"]}

    claimed = Task.objects.claim("worker-1", lease_seconds=60)
    assert run_task(claimed) == Task.Status.SUCCEEDED
    claimed.refresh_from_db()
    assert claimed.result["added"] == 3
    assert _symbols() == ["BTC/USDT", "ETH/BTC", "ETH/USDT"]


@pytest.mark.django_db
def test_the_admin_action_refreshes_and_the_admin_add_queues_a_refresh(admin_client, connector, fake):
    response = admin_client.post(
        "/admin/connectors/connector/",
        {"action": "refresh_markets", "_selected_action": [connector.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert [m.message for m in response.context["messages"]] == [
        "binance: 3 markets; 3 added, 0 updated, 0 delisted, 0 listed again; 0 job(s) stopped."
    ]
    assert _symbols() == ["BTC/USDT", "ETH/BTC", "ETH/USDT"]

    admin_client.post(
        "/admin/connectors/connector/add/",
        {
            "exchange_id": "simulated",
            "name": "",
            "enabled": "on",
            "options": "{}",
            "jobs-TOTAL_FORMS": "0",
            "jobs-INITIAL_FORMS": "0",
        },
    )
    simulated = Connector.objects.get(exchange_id="simulated")
    assert Task.objects.filter(kind=Task.Kind.MARKETS, params={"connector": simulated.pk}).exists()


# --- Exchanges and pairs -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_pairs_are_filtered_by_quote_base_active_and_search_and_paginated(api_client, connector, fake):
    connector.refresh_markets()
    del fake.listings["ETHBTC"]
    connector.refresh_markets()

    def symbols(query: str) -> list[str]:
        response = api_client.get(f"/api/v1/exchanges/binance/pairs{query}")
        assert response.status_code == 200, response.json()
        return [row["symbol"] for row in response.json()["results"]]

    assert symbols("") == ["BTC/USDT", "ETH/BTC", "ETH/USDT"]
    assert symbols("?quote=usdt") == ["BTC/USDT", "ETH/USDT"]
    assert symbols("?base=ETH") == ["ETH/BTC", "ETH/USDT"]
    assert symbols("?active=true") == ["BTC/USDT", "ETH/USDT"]
    assert symbols("?active=false") == ["ETH/BTC"]
    assert symbols("?search=btc") == ["BTC/USDT", "ETH/BTC"]
    page = api_client.get("/api/v1/exchanges/binance/pairs?page=1").json()
    assert page["count"] == 3
    assert page["results"][0]["delisted_at"] is None
    assert api_client.get("/api/v1/exchanges/binance/pairs?active=maybe").status_code == 400


@pytest.mark.django_db
def test_an_unknown_exchange_is_a_json_404_on_every_exchange_endpoint(api_client):
    for suffix in ("", "/pairs", "/timeframes", "/status"):
        response = api_client.get(f"/api/v1/exchanges/nope{suffix}")
        assert response.status_code == 404, suffix
        assert "Unknown exchange id 'nope'" in response.json()["detail"]


@pytest.mark.django_db
def test_the_exchange_detail_names_its_limits_connector_and_markets(api_client, connector):
    connector.refresh_markets()
    body = api_client.get("/api/v1/exchanges/binance").json()
    assert body["name"] == "Binance"
    assert body["fetch_ohlcv"] is True
    assert "1m" in body["timeframes"]
    assert body["connector"] == connector.pk
    assert body["markets"] == {"total": 3, "active": 3, "known": True}
    # The refresh's exchangeInfo did not cap the bucket (it is not collection's markets load), so the
    # announced limit shown is the published one; the bucket in force is the connector's.
    assert body["limits"]["announced_weight_per_minute"] == 6000
    assert body["limits"]["in_force"]["weight_per_minute"] == pytest.approx(5400)
    assert body["status"] == "ok"

    assert api_client.get("/api/v1/exchanges/kraken").json()["connector"] is None
    timeframes = api_client.get("/api/v1/exchanges/simulated/timeframes").json()
    assert timeframes == {"exchange_id": "simulated", **timeframes, "timeframes_known": True}
    assert "1d" in timeframes["timeframes"]


@pytest.mark.django_db
def test_the_exchange_status_counts_rate_limit_answers_of_the_last_hour(api_client, connector, time_machine):
    time_machine.move_to(datetime(2024, 3, 1, 10, 0, tzinfo=UTC), tick=False)
    RateLimit.objects.block("binance", 5)  # what a 429 answer does
    time_machine.move_to(datetime(2024, 3, 1, 11, 30, tzinfo=UTC), tick=False)
    RateLimit.objects.block("binance", 30)

    body = api_client.get("/api/v1/exchanges/binance/status").json()

    assert body["rate_limited_last_hour"] == 1
    assert body["backing_off"] is True
    assert body["state"] == "backing_off"
    assert body["circuit"] == "closed"
    assert body["bucket"]["capacity"] == 300
    assert body["last_success_at"] is None


@pytest.mark.django_db
def test_jobs_stopped_by_a_refresh_show_their_new_state_on_the_hub(connector, fake, django_capture_on_commit_callbacks):
    connector.refresh_markets()
    eth = Job.objects.create(connector=connector, symbol="ETH/USDT", timeframe="1m")
    del fake.listings["ETHUSDT"]

    with django_capture_on_commit_callbacks(execute=True):
        connector.refresh_markets()

    [event] = LiveEvent.objects.all()  # the embedded hub's outbox (no REDIS_URL here)
    assert event.payload["job"]["id"] == eth.pk
    assert event.payload["job"]["status"] == Job.Status.ERROR
