"""Live collection in real time: 2,000 series on 1m, 2 `run_scheduler` processes, against the fake Binance.

The fake Binance (tests/fakes/binance.py, in a child process, on the real clock) answers with 20 ms
latency and counts 6,000 weight per clock minute (429/418 past it). The schedulers start 5 s before a
minute closes with every job up to date, so all of them fall due at the same second, every minute, as in
production. Two real
`manage.py run_scheduler` processes (BENCH_LIVE_WORKERS threads each, default collector.yaml's) run for
BENCH_LIVE_SECONDS (default 150), then get SIGTERM.

Figures: p50/p99/max of the delay from a candle's close to the commit of the run that stored it, for every
candle that closed after the schedulers started. Exact, from the runs: each job's successful runs, in order,
wrote its candles in order (the fake has no holes, so they are the consecutive minutes after the starting
cursor; a job whose final cursor disagrees is counted and left out), so the k-th candle belongs to the run
whose running total of candles written first reaches k, and was committed when that run finished (its
pages commit before its release: an upper bound by the release's few ms). Candles that closed but were not
stored when the schedulers stopped count with the delay until the stop (a lower bound; their number is
printed). Also: runs/s, the exchange budget used (weight / 6,000 per minute), 429/418 answers, the CPU the
schedulers used, how busy their workers were, and a "bounded by" line naming what limits the delay.
Nothing is asserted.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dc_bench SECRET_KEY=x .venv/bin/python -m benchmarks live

Knobs: BENCH_LIVE_SERIES (2000), BENCH_LIVE_PROCESSES (2), BENCH_LIVE_WORKERS, BENCH_LIVE_SECONDS (150),
BENCH_LIVE_LATENCY_MS (20).
"""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from benchmarks.scratch import scratch_database

MINUTE = 60_000
ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_seconds() -> float:
    """User + system CPU of every PostgreSQL server process on this machine (its backends included; a
    backend that exited meanwhile is not counted, so the schedulers keep theirs open)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.find("(") + 1 : text.rfind(")")].startswith("postgres"):
            total += _cpu_seconds(int(stat.parent.name))
    return total


def close_to_commit_delays(cursor: int, started: float, stopped: float) -> tuple[list[float], int, int]:
    """(delays in seconds, candles closed but not stored by `stopped`, jobs left out); see the module doc."""
    from apps.jobs.models import Job, Run

    runs: dict[int, list[tuple[float, int]]] = {}
    for job_id, finished, written in (
        Run.objects.filter(status=Run.Status.SUCCESS, candles_written__gt=0)
        .order_by("finished_at")
        .values_list("job_id", "finished_at", "candles_written")
    ):
        runs.setdefault(job_id, []).append((finished.timestamp(), written))
    delays: list[float] = []
    late = mismatched = 0
    for job_id, final in Job.objects.values_list("id", "cursor"):
        done = runs.get(job_id, [])
        if final != cursor + sum(written for _, written in done) * MINUTE:
            mismatched += 1
            continue
        ts = cursor
        for finished, written in done:
            for _ in range(written):
                ts += MINUTE
                close = (ts + MINUTE) / 1000
                if close >= started:
                    delays.append(finished - close)
        # Closed before the stop, not stored: waiting still.
        ts += MINUTE
        while (ts + MINUTE) / 1000 <= stopped:
            if (ts + MINUTE) / 1000 >= started:
                delays.append(stopped - (ts + MINUTE) / 1000)
                late += 1
            ts += MINUTE
    return delays, late, mismatched


def bounded_by(
    budget_used: float,
    rejected: int,
    series: int,
    wall_per_run: float,
    cpu_per_run: float,
    slots: int,
    cores: int,
    load: float,
) -> str:
    """What limits the delay, from the run's own figures: the exchange, else the slower of two floors on the
    time one burst of `series` due runs takes (the workers' wall time per run, the CPU of the schedulers and
    PostgreSQL per run)."""
    if rejected:
        return f"the exchange: {rejected} requests rejected (429/418)"
    if budget_used >= 0.9:
        return f"the exchange budget ({budget_used:.0%} of 6,000 weight a minute used)"
    workers_floor = wall_per_run * series / slots
    cpu_floor = cpu_per_run * series / cores
    workers = (
        f"{series} runs x {wall_per_run * 1000:.0f} ms of wall time / {slots} workers = {workers_floor:.0f} s a burst"
    )
    cpu = (
        f"{series} runs x {cpu_per_run * 1000:.1f} ms of CPU (schedulers and PostgreSQL) / {cores} cores "
        f"= {cpu_floor:.0f} s a burst (load average {load:.1f})"
    )
    if workers_floor >= cpu_floor:
        return f"the workers: {workers}; then CPU: {cpu}"
    return f"CPU: {cpu}; then the workers: {workers}"


def main() -> None:
    series = int(os.environ.get("BENCH_LIVE_SERIES", "2000"))
    processes = int(os.environ.get("BENCH_LIVE_PROCESSES", "2"))
    seconds = float(os.environ.get("BENCH_LIVE_SECONDS", "150"))
    latency = float(os.environ.get("BENCH_LIVE_LATENCY_MS", "20"))

    with scratch_database("live"):
        from apps.connectors.models import Connector
        from apps.jobs.models import Job, Run
        from apps.marketdata.timeframes import ms_to_datetime
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
            # Start 5 s before a minute closes, every job up to date and due at that close, as a live fleet
            # is every minute: each run of the same length then sees the same bursts (at +5 s, +65 s, ...).
            time.sleep((55 - time.time() % 60) % 60)
            next_close_ms = (int(time.time() * 1000) // MINUTE + 1) * MINUTE
            cursor = next_close_ms - 2 * MINUTE  # the last closed candle: nothing due before the next close
            due = ms_to_datetime(next_close_ms) + timedelta(seconds=get_config().scheduler.schedule_delay_seconds)
            Job.objects.bulk_create(
                Job(connector=connector, symbol=symbol, timeframe="1m", cursor=cursor, next_run_at=due)
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
            fake_cpu, postgres_cpu = _cpu_seconds(fake.pid), _postgres_cpu_seconds()
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
                # The machine is shared: sample its load while the schedulers run, to say what bounded them.
                loads = []
                while time.time() < started + seconds:
                    time.sleep(min(5.0, max(0.0, started + seconds - time.time())))
                    loads.append(os.getloadavg()[0])
                cpu_seconds = sum(_cpu_seconds(child.pid) for child in children)
                fake_cpu = _cpu_seconds(fake.pid) - fake_cpu
                postgres_cpu = _postgres_cpu_seconds() - postgres_cpu
            finally:
                for child in children:
                    child.send_signal(signal.SIGTERM)
                for child in children:
                    try:
                        child.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        child.kill()
            stopped = time.time()
            elapsed = stopped - started
            fake.refresh()
            delays, late, mismatched = close_to_commit_delays(cursor, started, stopped)
            runs = Run.objects.filter(status=Run.Status.SUCCESS)
            succeeded = runs.count()
            failed = Run.objects.filter(status=Run.Status.FAILED).count()
            busy = sum(
                (finished - begun).total_seconds() for begun, finished in runs.values_list("started_at", "finished_at")
            )
            budget = 6000 * elapsed / 60
            used = fake.counts["weight"] / budget
            cpu_per_run = cpu_seconds / max(1, succeeded)
            cpu_share = cpu_seconds / elapsed / (os.cpu_count() or 1)
            worker_share = busy / (elapsed * processes * workers)
            load = sum(loads) / len(loads) if loads else os.getloadavg()[0]
            wall_per_run = busy / max(1, succeeded)
            p99 = percentile(delays, 0.99)
            print(
                f"runs: {succeeded} succeeded, {failed} failed, {succeeded / elapsed:.1f} runs/s; "
                f"close-to-commit delay p50 {percentile(delays, 0.5):.1f}s p99 {p99:.1f}s "
                f"max {max(delays, default=float('nan')):.1f}s over {len(delays)} candles "
                f"({late} not stored by the stop, counted until it; {mismatched} jobs left out); "
                f"requests {fake.counts['requests']}, weight {fake.counts['weight']} = {used:.0%} of the budget; "
                f"429: {fake.counts['429']}, 418: {fake.counts['418']}",
                flush=True,
            )
            print(
                f"schedulers: {cpu_seconds:.1f} CPU s = {cpu_per_run * 1000:.1f} ms a run "
                f"({wall_per_run * 1000:.0f} ms "
                f"of wall time), {cpu_share:.0%} of the machine; workers busy {worker_share:.0%} of the time; "
                f"load average {load:.2f} while they ran (sampled every 5 s)",
                flush=True,
            )
            per_run = 1000 / max(1, succeeded)
            print(
                f"CPU a run: schedulers {cpu_per_run * 1000:.1f} ms + PostgreSQL {postgres_cpu * per_run:.1f} ms "
                f"+ the fake exchange {fake_cpu * per_run:.1f} ms (it shares this machine; a real one does not)",
                flush=True,
            )
            cores = os.cpu_count() or 1
            server_cpu_per_run = cpu_per_run + postgres_cpu / max(1, succeeded)
            bound = bounded_by(
                used, fake.counts["429"], series, wall_per_run, server_cpu_per_run, processes * workers, cores, load
            )
            print(f"bounded by: {bound}", flush=True)
        finally:
            fake.stop()
