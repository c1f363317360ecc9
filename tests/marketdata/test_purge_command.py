"""manage.py purge: a dry run by default that prints what would go; --yes deletes it."""

import io

import time_machine
from django.core.management import call_command

from apps.marketdata import store
from tests.marketdata.test_retention import CUTOFF, MINUTE, NOW, SERIES, candle


def run(*args: str) -> str:
    out = io.StringIO()
    with time_machine.travel(NOW, tick=False):
        call_command("purge", *args, stdout=out)
    return out.getvalue()


def test_the_dry_run_prints_what_would_go_and_deletes_nothing(db, candle_store, retention_config):
    retention_config({"1m": 1})
    store.upsert_candles(*SERIES, [candle(CUTOFF - 2 * MINUTE), candle(CUTOFF - MINUTE), candle(CUTOFF)])

    output = run()

    assert "binance BTC/USDT 1m: would delete 2 candles before 2024-02-29T12:00:30Z (keep 1 days)" in output
    assert "would delete 2 candles in 1 series (dry run: --yes deletes)" in output
    assert len(store.read_candles(*SERIES)) == 3


def test_yes_deletes_and_reports(db, candle_store, retention_config):
    retention_config({"1m": 1})
    store.upsert_candles(*SERIES, [candle(CUTOFF - MINUTE), candle(CUTOFF)])

    output = run("--yes")

    assert "binance BTC/USDT 1m: deleted 1 candles before 2024-02-29T12:00:30Z" in output
    assert "deleted 1 candles in 1 series" in output
    assert [row[0] for row in store.read_candles(*SERIES)] == [CUTOFF]
    assert store.statistics(*SERIES).candles == 1
    assert run("--yes").strip() == "deleted 0 candles in 0 series"


def test_without_retention_there_is_nothing_to_purge(db, sql_store):
    store.upsert_candles(*SERIES, [candle(0)])
    assert run().strip() == "would delete 0 candles in 0 series"
