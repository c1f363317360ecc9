"""Cost of indicators with the default set: a full recompute of 500,000 1m candles, and incremental updates.

Runs against the embedded store on PostgreSQL, in a scratch database created next to DATABASE_URL's and
dropped afterwards. One series of BENCH_INDICATOR_CANDLES (default 500,000) 1m candles, a random walk.

  full recompute   recompute_series over the whole series (what `recompute_indicators` does per series)
  update           update_indicators after appending 1,000 new candles (what one collection run of a
                   series that fell 1,000 candles behind costs); the median of BENCH_INDICATOR_RUNS runs
  update again     the same update repeated: nothing changed, so no row is rewritten
  revised          update_indicators after revising the first of those 1,000 candles: every row from
                   there on changes (EMA memory), so all 1,000 are rewritten

Each line splits the wall time into reading candles (warm-up history plus the new range), computing (ta
and the stability mask) and writing rows, so it says which part dominates, and gives the CPU time of this
process and of the PostgreSQL backend serving it (from /proc, when the server is local): on a busy
machine the wall time is mostly waiting, and the CPU figures are what an idle one would approach. The
server's CPU comes in 10 ms clock ticks, so its figure is the mean over the runs, not the median.
Goal: an update of 1,000 candles in at most 15 ms per series. Figures are for comparison between runs
on the same machine; never asserted.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/datacollector python -m benchmarks indicators
    BENCH_INDICATOR_CANDLES=100000 python -m benchmarks.bench_indicators    # a quicker run
"""

import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.scratch import DEFAULT_DATABASE_URL, scratch_database

TOTAL = int(os.environ.get("BENCH_INDICATOR_CANDLES", "500000"))
RUNS = int(os.environ.get("BENCH_INDICATOR_RUNS", "9"))
UPDATE = 1_000
T0 = 1_577_836_800_000  # 2020-01-01 00:00 UTC
MINUTE = 60_000
SERIES = ("binance", "BTC/USDT", "1m")


@contextmanager
def timed_parts() -> Iterator[dict[str, float]]:
    """Seconds spent reading, computing and writing in the store and the indicator module while the block runs."""
    from apps.marketdata import indicators, store

    parts: dict[str, float] = defaultdict(float)
    originals = {
        "read_closes": store.read_closes,
        "write_indicators": store.write_indicators,
    }
    compute = indicators.IndicatorSet.compute

    def timer(part: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[part] += time.perf_counter() - started

        return wrapper

    store.read_closes = timer("read", originals["read_closes"])
    store.write_indicators = timer("write", originals["write_indicators"])
    indicators.IndicatorSet.compute = timer("compute", compute)
    try:
        yield parts
    finally:
        store.read_closes = originals["read_closes"]
        store.write_indicators = originals["write_indicators"]
        indicators.IndicatorSet.compute = compute


def store_candles(first: int, count: int, close: list[float]) -> int:
    from apps.marketdata import store

    rows = [[T0 + (first + i) * MINUTE, c, c * 1.0005, c * 0.9995, c, 1.0] for i, c in enumerate(close)]
    for start in range(0, len(rows), 50_000):
        store.upsert_candles(*SERIES, rows[start : start + 50_000])
    return T0 + first * MINUTE


def backend_cpu() -> float | None:
    """CPU seconds of the PostgreSQL backend serving our connection (readable when the server is local)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [pid] = cursor.fetchone()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(action: Callable[[], int]) -> dict[str, float]:
    """Wall time, its read/compute/write split, and CPU seconds of this process and of the server."""
    server = backend_cpu()
    with timed_parts() as parts:
        cpu, wall = time.process_time(), time.perf_counter()
        rows = action()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server_after = backend_cpu()
    return {
        "wall": wall,
        **parts,
        "client_cpu": cpu,
        "server_cpu": float("nan") if server is None or server_after is None else server_after - server,
        "rows": rows,
    }


def report(label: str, runs: list[dict[str, float]]) -> None:
    """The median of each figure over the runs (a single run is its own median)."""
    m = {key: statistics.median(run.get(key, 0.0) for run in runs) for key in runs[0]}
    m["server_cpu"] = statistics.fmean(run["server_cpu"] for run in runs)  # ticks: a median would be 0 or 10 ms
    split = "  ".join(f"{name} {1000 * m.get(name, 0.0):7.1f}" for name in ("read", "compute", "write"))
    dominant = max(("read", "compute", "write"), key=lambda name: m.get(name, 0.0))
    print(
        f"  {label:<40} {1000 * m['wall']:9.1f} ms wall  ({split} ms; {dominant} dominates)  "
        f"CPU: client {1000 * m['client_cpu']:7.1f} ms, server {1000 * m['server_cpu']:7.1f} ms  "
        f"{int(m['rows']):,} rows",
        flush=True,
    )


def run() -> None:
    import numpy as np

    from apps.marketdata.indicators import indicator_set, recompute_series, update_indicators

    indicators = indicator_set()
    rng = np.random.default_rng(1)
    walk = (30_000 * np.exp(np.cumsum(rng.normal(0, 0.001, TOTAL + RUNS * UPDATE)))).tolist()

    started = time.perf_counter()
    store_candles(0, TOTAL, walk[:TOTAL])
    print(f"  (stored {TOTAL:,} candles in {time.perf_counter() - started:.1f}s; not part of the figures)")
    print(f"  columns: {', '.join(indicators.names)}; warm-up {indicators.warmup} candles")

    report(f"full recompute of {TOTAL:,}", [measure(lambda: recompute_series(*SERIES))])
    updates, repeats, revisions = [], [], []
    for run_index in range(RUNS):
        first = TOTAL + run_index * UPDATE
        from_ts = store_candles(first, UPDATE, walk[first : first + UPDATE])
        updates.append(measure(lambda from_ts=from_ts: update_indicators(*SERIES, from_ts)))
        repeats.append(measure(lambda from_ts=from_ts: update_indicators(*SERIES, from_ts)))
        store_candles(first, 1, [walk[first] * 1.001])
        revisions.append(measure(lambda from_ts=from_ts: update_indicators(*SERIES, from_ts)))
    report(f"update, {UPDATE:,} new (median of {RUNS})", updates)
    report(f"same update again (median of {RUNS})", repeats)
    report(f"revised, {UPDATE:,} rewritten (median of {RUNS})", revisions)
    walls = sorted(1000 * run["wall"] for run in updates)
    print(f"  update wall: best {walls[0]:.1f} ms, worst {walls[-1]:.1f} ms; goal <= 15 ms per 1,000 candles")


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")
    os.environ.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
    import django

    django.setup()

    print(f"machine: {os.cpu_count()} CPUs, shared with other work; load average {os.getloadavg()[0]:.1f}")
    with scratch_database("indicators") as name:
        print(f"embedded store on PostgreSQL ({TOTAL:,} 1m candles, scratch database {name}):", flush=True)
        run()


if __name__ == "__main__":
    sys.exit(main())
