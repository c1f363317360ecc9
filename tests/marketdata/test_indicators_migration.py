"""Migration 0002: JSON indicator rows become packed rows with the same values, and back.

PostgreSQL converts in SQL (this test); the Python path SQLite takes is run by
test_indicators_sqlite.py. Transactional, because the migrations change tables.
"""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from apps.marketdata.store import read_indicators

INITIAL = ("marketdata", "0001_initial")
SERIES = ("binance", "BTC/USDT", "1m")
ROWS = {
    1_700_000_000_000: {"sma_20": 30_123.456789012345, "ema_12": None, "rsi_14": 33.25, "macd": -0.1 - 0.2},
    1_700_000_060_000: {"sma_20": 1e-300, "ema_12": 1_234_567.891, "rsi_14": None, "macd": 0.0},
    1_700_000_120_000: {},
}


def migrate(target: tuple[str, str]) -> MigrationExecutor:
    executor = MigrationExecutor(connection)
    executor.migrate([target])
    return MigrationExecutor(connection)  # a fresh loader sees the new state


@pytest.mark.django_db(transaction=True)
def test_json_rows_are_converted_with_exact_values_and_back(sql_store):
    latest = ("marketdata", MigrationExecutor(connection).loader.graph.leaf_nodes("marketdata")[0][1])
    try:
        executor = migrate(INITIAL)
        json_rows = executor.loader.project_state([INITIAL]).apps.get_model("marketdata", "IndicatorRow")
        for ts, values in ROWS.items():
            json_rows.objects.create(exchange_id=SERIES[0], symbol=SERIES[1], timeframe=SERIES[2], ts=ts, values=values)

        migrate(latest)
        assert read_indicators(*SERIES) == list(ROWS.items())

        executor = migrate(INITIAL)
        json_rows = executor.loader.project_state([INITIAL]).apps.get_model("marketdata", "IndicatorRow")
        assert dict(json_rows.objects.values_list("ts", "values")) == ROWS
    finally:
        migrate(latest)
