"""Live collection in real time: 2,000 series on 1m, 2 `run_scheduler` processes, against the fake Binance.

The fake Binance (tests/fakes/binance.py, in a child process, on the real clock) answers with 20 ms
latency and counts 6,000 weight per clock minute (429/418 past it). Every job starts with its cursor
one candle behind, so all of them fall due at the same second, every minute, as in production. Two real
`manage.py run_scheduler` processes (BENCH_LIVE_WORKERS threads each, default collector.yaml's) run for
BENCH_LIVE_SECONDS (default 150), then get SIGTERM.

Figures: p50/p99/max of the delay from a candle's close to the commit of the run that stored it (for a
run that stored n candles, its oldest one: n - 1 minutes before the close its start followed), runs/s,
the exchange budget used (weight / 6,000 per minute) and 429/418 answers. Nothing is asserted.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dc_bench SECRET_KEY=x .venv/bin/python -m benchmarks live

Knobs: BENCH_LIVE_SERIES (2000), BENCH_LIVE_PROCESSES (2), BENCH_LIVE_WORKERS, BENCH_LIVE_SECONDS (150),
BENCH_LIVE_LATENCY_MS (20).
"""

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.scratch import scratch_database

MINUTE = 60_000
ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def main() -> None:
    series = int(os.environ.get("BENCH_LIVE_SERIES", "2000"))
    processes = int(os.environ.get("BENCH_LIVE_PROCESSES", "2"))
    seconds = float(os.environ.get("BENCH_LIVE_SECONDS", "150"))
    latency = float(os.environ.get("BENCH_LIVE_LATENCY_MS", "20"))

    with scratch_database("live"):
        from django.utils import timezone

        from apps.connectors.models import Connector
        from apps.jobs.models import Job, Run
        from benchmarks.bench_backfill import RemoteFake
        from datacollector.config import get_config

        workers = int(os.environ.get("BENCH_LIVE_WORKERS", str(get_config().scheduler.workers)))
        now_ms = int(time.time() * 1000)
        symbols = [f"S{i:04d}/USDT" for i in range(series)]
        fake = RemoteFake(
            symbols={symbol: now_ms - 30 * 86_400_000 for symbol in symbols}, weight_limit=6000, latency_ms=latency
        )
        try:
            connector = Connector.objects.create(exchange_id="binance", options=fake.ccxt_options(timeout=10_000))
            # One candle behind: every job is due now and at every minute's close after.
            cursor = now_ms // MINUTE * MINUTE - 2 * MINUTE
            Job.objects.bulk_create(
                Job(connector=connector, symbol=symbol, timeframe="1m", cursor=cursor, next_run_at=timezone.now())
                for symbol in symbols
            )
            print(
                f"{series} series on 1m, {processes} run_scheduler processes x {workers} workers, {seconds:.0f}s; "
                f"fake Binance {latency:g} ms latency, 6,000 weight/min; load average {os.getloadavg()[0]:.2f} "
                f"on {os.cpu_count()} cores",
                flush=True,
            )
            fake.reset()
            env = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING"}
            started = time.time()
            children = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "manage.py",
                        "run_scheduler",
                        "--workers",
                        str(workers),
                        "--worker-id",
                        f"live{n}",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for n in range(processes)
            ]
            try:
                time.sleep(seconds)
            finally:
                for child in children:
                    child.send_signal(signal.SIGTERM)
                for child in children:
                    try:
                        child.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        child.kill()
            elapsed = time.time() - started
            fake.refresh()
            runs = list(
                Run.objects.filter(status=Run.Status.SUCCESS).values_list(
                    "started_at", "finished_at", "candles_written"
                )
            )
            delays = []
            for run_started, finished, written in runs:
                if not written:
                    continue
                close_ms = int(run_started.timestamp() * 1000) // MINUTE * MINUTE - (written - 1) * MINUTE
                delays.append(finished.timestamp() - close_ms / 1000)
            failed = Run.objects.filter(status=Run.Status.FAILED).count()
            budget = 6000 * elapsed / 60
            print(
                f"runs: {len(runs)} succeeded, {failed} failed, {len(runs) / elapsed:.1f} runs/s; "
                f"close-to-commit delay p50 {statistics.median(delays) if delays else float('nan'):.1f}s "
                f"p99 {percentile(delays, 0.99):.1f}s max {max(delays, default=float('nan')):.1f}s "
                f"({len(delays)} candles' runs); requests {fake.counts['requests']}, weight {fake.counts['weight']} "
                f"= {fake.counts['weight'] / budget:.0%} of the budget; 429: {fake.counts['429']}, "
                f"418: {fake.counts['418']}",
                flush=True,
            )
        finally:
            fake.stop()
