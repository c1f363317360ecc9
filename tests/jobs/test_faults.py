"""Sustained faults end no job that makes progress: `backfill` through real ccxt against the fake Binance
injecting HTTP 5xx (HTML and Binance error bodies) and truncated 200 bodies ends with exactly the
exchange's closed candles. The client's backoff is shortened through `exchanges.RETRY_POLICY` (the
policy collector.yaml's `retry` section fills in production); the fake answers without latency.
"""

import io
from datetime import UTC, datetime

import pytest
from django.core.management import call_command

from apps.connectors import exchanges
from apps.connectors.exchanges import RetryPolicy
from apps.connectors.models import Connector
from apps.jobs.models import Run
from apps.marketdata import store
from apps.marketdata.timeframes import datetime_to_ms
from tests.fakes.binance import FakeBinance, Faults

NOW_MS = datetime_to_ms(datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC))
DAY = 86_400_000
SYMBOLS = ["BTC/USDT", "ETH/USDT"]


@pytest.fixture(autouse=True)
def setup(settings, monkeypatch):
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    monkeypatch.setattr(
        exchanges, "RETRY_POLICY", RetryPolicy(initial_seconds=0.01, max_seconds=0.05, no_progress_seconds=60)
    )
    exchanges.clear_clients()
    yield
    exchanges.clear_clients()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_backfill_under_sustained_5xx_and_truncated_bodies_ends_with_exactly_the_closed_candles():
    listings = {symbol: NOW_MS - 30 * DAY for symbol in SYMBOLS}
    # 15% HTTP 5xx (a third with HTML bodies, the rest Binance's -1000/-1001/-1007/-1008) and 10% truncated.
    faults = Faults(server_error=0.05, binance_error=0.10, truncated=0.10, seed=11)
    with FakeBinance(listings, now_ms=NOW_MS, faults=faults) as fake:
        Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=2000))
        since_ms = NOW_MS - 10 * DAY
        out, err = io.StringIO(), io.StringIO()
        call_command(
            "backfill", "--exchange", "binance", "--symbol", ",".join(SYMBOLS), "--timeframe", "1m,1h",
            "--since", str(since_ms), "--workers", "2", stdout=out, stderr=err, verbosity=0,
        )  # fmt: skip

        for symbol in SYMBOLS:
            for timeframe in ("1m", "1h"):
                expected = fake.closed_candles(symbol, timeframe, since_ms)
                assert store.read_candles("binance", symbol, timeframe) == expected, (symbol, timeframe)
        assert fake.counts["429"] == fake.counts["418"] == 0
        injected = {name: fake.counts[name] for name in ("server_error", "binance_error", "truncated")}
        assert all(injected.values()), injected  # the faults did happen
    assert set(Run.objects.values_list("status", flat=True)) == {Run.Status.SUCCESS}
