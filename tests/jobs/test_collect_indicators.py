"""Indicators during a long collection: brought up to date every INDICATOR_CHUNK_CANDLES written candles.

A backfill then ends with one chunk left to compute, not the whole series; the stored rows must be the
same as one computation over the whole series, and every candle must have its row.
"""

from datetime import UTC, datetime

import numpy as np
import pytest
import time_machine

from apps.connectors import exchanges
from apps.connectors.models import Connector
from apps.jobs import collect
from apps.jobs.collect import collect_job
from apps.jobs.models import Job
from apps.marketdata import indicators, store

NOW = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC)


@pytest.fixture
def job(db, settings) -> Job:
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    exchanges.clear_clients()
    connector = Connector.objects.create(exchange_id="simulated")
    yield Job.objects.create(
        connector=connector, symbol="BTC/USDT", timeframe="1m", since=datetime(2024, 2, 27, tzinfo=UTC)
    )
    exchanges.clear_clients()


def indicator_rows(job: Job) -> tuple[list[int], dict[str, np.ndarray]]:
    rows = store.read_indicators(job.exchange_id, job.symbol, job.timeframe)
    names = indicators.indicator_set().names
    values = {name: np.array([np.nan if row[1][name] is None else row[1][name] for row in rows]) for name in names}
    return [row[0] for row in rows], values


def test_a_long_collection_computes_indicators_in_chunks_equal_to_one_computation(job, monkeypatch):
    monkeypatch.setattr(collect, "INDICATOR_CHUNK_CANDLES", 1_500)
    calls = []
    original = collect.refresh_indicators
    monkeypatch.setattr(collect, "refresh_indicators", lambda *args: calls.append(args[3]) or original(*args))

    with time_machine.travel(NOW, tick=False):
        result = collect_job(job, None, lambda: None, max_pages=None)

    candles = store.read_candles(job.exchange_id, job.symbol, job.timeframe)
    assert result.candles_written == len(candles) > 3 * 1_500
    # Pages of 1,000: after pages 2 and 4 (1,500 reached), then the rest at the end; each from where the last ended.
    assert calls == [candles[0][0], candles[2_000][0], candles[4_000][0]]
    ts, chunked = indicator_rows(job)
    assert ts == [row[0] for row in candles]

    indicators.recompute_series(job.exchange_id, job.symbol, job.timeframe)
    _, whole = indicator_rows(job)
    for name, values in whole.items():
        assert np.array_equal(np.isnan(chunked[name]), np.isnan(values)), name
        assert np.allclose(chunked[name], values, rtol=1e-9, atol=0, equal_nan=True), name


def test_a_run_keeps_its_newest_candles_and_their_indicator_values_as_stored(job):
    with time_machine.travel(NOW, tick=False):
        result = collect_job(job, None, lambda: None, max_pages=None)

    candles = store.read_candles(job.exchange_id, job.symbol, job.timeframe)
    assert [tuple(row) for row in result.latest] == [tuple(row) for row in candles[-collect.LATEST_KEPT :]]
    stored = dict(store.read_indicators(job.exchange_id, job.symbol, job.timeframe, start_ts=result.latest[0][0]))
    assert result.latest_indicators == stored  # what the live hub publishes, without reading it back
