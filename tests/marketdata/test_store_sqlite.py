"""The embedded store on SQLite (the default database of `make run`), in a child process.

The test suite's database is PostgreSQL, so the SQLite upsert path (ON CONFLICT ... RETURNING plus a read
of the existing keys, as SQLite has no xmax) runs in a subprocess against a scratch SQLite file.
"""

from pathlib import Path

import pytest

from tests.marketdata.conftest import run_on_sqlite

SCRIPT = """
import json
import django

django.setup()
from django.core.management import call_command

call_command("migrate", "marketdata", verbosity=0)
from apps.marketdata import store

T0, M = 1_704_067_200_000, 60_000
series = ("binance", "BTC/USDT", "1m")
rows = [[T0 + i * M, 1.0 + i, 2.0 + i, 0.5, 1.5, 10.0] for i in range(2_500) if i not in (7, 8)]
results = [store.upsert_candles(*series, rows), store.upsert_candles(*series, rows)]
revised = [*rows[:3], [T0 + M, 9.0, 9.0, 9.0, 9.0, 9.0], [T0 + 7 * M, 1.0, 1.0, 1.0, 1.0, 1.0]]
results.append(store.upsert_candles(*series, revised))
print(json.dumps({
    "results": results,
    "coverage": store.coverage(*series),
    "gaps": store.find_gaps(*series, start_ts=T0 - 2 * M),
    "second": store.read_candles(*series, start_ts=T0 + M, limit=1),
}))
"""


@pytest.mark.slow
def test_the_embedded_store_keeps_its_contract_on_sqlite(tmp_path: Path):
    report = run_on_sqlite(SCRIPT, tmp_path / "store.sqlite3")
    t0, minute = 1_704_067_200_000, 60_000
    assert report["results"] == [[2_498, 0, 0], [0, 0, 2_498], [1, 1, 2]]
    assert report["coverage"] == [t0, t0 + 2_499 * minute, 2_499]
    assert report["gaps"] == [[t0 - 2 * minute, t0 - minute], [t0 + 8 * minute, t0 + 8 * minute]]
    assert report["second"] == [[t0 + minute, 9.0, 9.0, 9.0, 9.0, 9.0]]
