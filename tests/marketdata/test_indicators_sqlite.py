"""Indicators on the embedded store over SQLite (the default database of `make run`), in a child process.

The suite's database is PostgreSQL, so the portable write path (bulk_create with update_conflicts), the
candle read and the Python path of the migration from JSON rows run in a subprocess against a scratch
SQLite file.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from apps.marketdata.indicators import IndicatorSet
from datacollector.config import IndicatorConfig
from tests.marketdata.conftest import run_on_sqlite
from tests.marketdata.test_indicators import errors, random_walk

SCRIPT = """
import json
import sys

import django

django.setup()
from django.core.management import call_command

# A JSON row from before migration 0002, converted by its Python path.
call_command("migrate", "marketdata", "0001", verbosity=0)
from django.db import connection

with connection.cursor() as cursor:
    cursor.execute(
        'INSERT INTO marketdata_indicatorrow (exchange_id, symbol, timeframe, ts, "values") '
        "VALUES (%s, %s, %s, %s, %s)",
        ["binance", "ETH/USDT", "1m", 1, json.dumps({"sma_20": 2345.678901234567, "rsi_14": None})],
    )
call_command("migrate", "marketdata", verbosity=0)
from apps.marketdata import store
from apps.marketdata.indicators import update_indicators
from apps.marketdata.store import read_indicators

T0, M = 1_704_067_200_000, 60_000
series = ("binance", "BTC/USDT", "1m")
close = json.loads(sys.stdin.read())
converted = read_indicators("binance", "ETH/USDT", "1m")
rows = [[T0 + i * M, c, c, c, c, 1.0] for i, c in enumerate(close)]
store.upsert_candles(*series, rows[:1_200])
written = [update_indicators(*series, T0)]
store.upsert_candles(*series, rows[1_200:])
written.append(update_indicators(*series, T0 + 1_200 * M))
written.append(update_indicators(*series, T0 + 1_200 * M))  # again: idempotent
print(json.dumps({"written": written, "rows": read_indicators(*series), "converted": converted}))
"""


@pytest.mark.slow
def test_incremental_updates_and_converted_rows_on_sqlite_equal_a_full_recompute(tmp_path: Path):
    close = random_walk(n=1_500, seed=17)
    report = run_on_sqlite(SCRIPT, tmp_path / "indicators.sqlite3", stdin=json.dumps(close.tolist()))
    assert report["converted"] == [[1, {"sma_20": 2345.678901234567, "rsi_14": None}]]
    assert report["written"] == [1_200, 300, 300]
    rows = report["rows"]
    assert [ts for ts, _ in rows] == [1_704_067_200_000 + i * 60_000 for i in range(1_500)]
    indicators = IndicatorSet(IndicatorConfig())
    expected = indicators.compute(close)
    for name in indicators.names:
        got = np.array([np.nan if values[name] is None else values[name] for _, values in rows])
        assert np.array_equal(np.isnan(got), np.isnan(expected[name])), name
        assert errors(name, got, expected[name], close)[~np.isnan(got)].max(initial=0.0) < 1e-9, name
