"""Backfill throughput against the fake Binance: 5 symbols x 90 days of 1m candles (~650,000).

The real `manage.py backfill` (real ccxt, the shared PostgreSQL rate limiter, the embedded candle store
on PostgreSQL) against tests/fakes/binance.py served from a separate process (so the server's CPU and its
share of the GIL do not slow the collector, nor its memory count as the collector's): 20 ms latency per request and
Binance's 6,000 weight per clock minute, with 429/418 when exceeded. The connector's bucket is the
collector.yaml default for Binance (5,400 per minute, burst 300). Two scenarios, each with 1 and 4
workers:
- "binance": Binance's real costs (klines weigh 2 and return 1,000 candles), so 650,000 candles need
  only ~1,300 weight: the store and the latency bound the run, not the budget;
- "budget": pages of 100 candles, so the run needs ~13,000 weight (over two minutes of budget) and the
  shared limiter is what paces it: this is where "share of the budget used" and "zero 429s" matter.

Figures: candles/s, weight used and its share of the server's budget (6,000/min) over the whole run and
over the part of it while every worker had a series to collect (with more workers than series left, the
last series run alone: one cursor per series), the weight of each whole clock minute, 429/418 answers,
resident memory at 25/50/75/100% of the run (flat = no growth with the range). Nothing is asserted.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dc_bench SECRET_KEY=x .venv/bin/python -m benchmarks backfill

A scratch database `<name>_bench_backfill` is created and dropped. Environment knobs for a quick run:
BENCH_BACKFILL_DAYS (default 90), BENCH_BACKFILL_SYMBOLS (5), BENCH_BACKFILL_WORKERS ("1,4"),
BENCH_BACKFILL_SCENARIOS ("binance,budget"), BENCH_BACKFILL_LATENCY_MS (20), BENCH_BACKFILL_PREFETCH
(backfill --prefetch, 2; 0 is one request at a time per series).
"""

import collections
import contextlib
import dataclasses
import io
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator

MINUTE = 60_000
DAY = 86_400_000
SERVER_LIMIT = 6000
SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "BNB/USDT", "XRP/USDT", "ADA/USDT", "DOGE/USDT", "LTC/USDT"]


def _env_list(name: str, default: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, default).split(",") if part.strip()]


@contextlib.contextmanager
def scratch_database() -> Iterator[None]:
    """Point Django's default database at a fresh `<name>_bench_backfill`, migrated; drop it afterwards."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    django.setup()
    import psycopg
    from django.core.management import call_command
    from django.db import connections

    settings_dict = connections["default"].settings_dict
    if connections["default"].vendor != "postgresql":
        raise SystemExit("set DATABASE_URL=postgres://...: the backfill benchmark needs PostgreSQL")
    original = settings_dict["NAME"]
    scratch = f"{original}_bench_backfill"

    def admin(sql: str) -> None:
        with psycopg.connect(
            host=settings_dict["HOST"] or "127.0.0.1",
            port=settings_dict["PORT"] or 5432,
            user=settings_dict["USER"] or "postgres",
            password=settings_dict["PASSWORD"] or None,
            dbname="postgres",
            autocommit=True,
        ) as connection:
            connection.execute(sql)

    admin(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{scratch}"')
    connections.close_all()
    # Every connection (this thread's and the workers') is made from this same settings dict.
    settings_dict["NAME"] = scratch
    try:
        call_command("migrate", verbosity=0, interactive=False)
        yield
    finally:
        connections.close_all()
        settings_dict["NAME"] = original
        admin(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')


class MemorySampler:
    """Resident set size of this process, sampled every 0.25 s in a thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._rss()))
            self._stop.wait(0.25)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self._rss()))

    def quartiles_mb(self) -> list[float]:
        n = len(self.samples)
        return [self.samples[min(n - 1, int(n * q))][1] / 2**20 for q in (0.25, 0.5, 0.75)] + [
            self.samples[-1][1] / 2**20
        ]


def _serve_fake(control, kwargs: dict) -> None:
    """The child process: serve a FakeBinance and answer the parent's requests for its counters."""
    from tests.fakes.binance import FakeBinance

    fake = FakeBinance(**kwargs).start()
    control.send(fake.url)
    while True:
        command = control.recv()
        if command == "reset":
            fake.counts.clear()
            fake.weight_per_minute.clear()
            fake.weight_per_second.clear()
            fake.klines_requests.clear()
            control.send(None)
        elif command == "stats":
            control.send((dict(fake.counts), dict(fake.weight_per_minute), dict(fake.weight_per_second)))
        else:  # "stop"
            fake.stop()
            control.send(None)
            return


class RemoteFake:
    """A FakeBinance in a child process (spawned: no copy of this process' Django state or connections)."""

    def __init__(self, **kwargs: object) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self._process = context.Process(target=_serve_fake, args=(child, kwargs), name="fake-binance", daemon=True)
        self._process.start()
        self.url: str = self._control.recv()
        self.counts: dict[str, int] = {}
        self.weight_per_minute: dict[int, int] = {}
        self.weight_per_second: dict[int, int] = {}

    def ccxt_options(self, **extra: object) -> dict:
        api = f"{self.url}/api/v3"
        return {"urls": {"api": {"public": api, "private": api, "v1": f"{self.url}/api/v1"}}, **extra}

    def reset(self) -> None:
        self._control.send("reset")
        self._control.recv()

    def refresh(self) -> None:
        self._control.send("stats")
        counts, per_minute, per_second = self._control.recv()
        self.counts = collections.Counter(counts)
        self.weight_per_minute = per_minute
        self.weight_per_second = per_second

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._control.send("stop")
            self._control.recv()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()


def reset() -> None:
    from apps.connectors import exchanges
    from apps.connectors.models import Connector
    from apps.marketdata.models import Candle, Gap, IndicatorRow
    from apps.ratelimits.models import RateLimit

    Connector.objects.all().delete()  # jobs and runs cascade
    Candle.objects.all().delete()
    IndicatorRow.objects.all().delete()
    Gap.objects.all().delete()
    RateLimit.objects.all().delete()
    exchanges.clear_clients()


def all_busy_share(fake: RemoteFake, started: float, workers: int) -> tuple[float, float]:
    """(share of the server's budget used, seconds) while every worker had a series to collect.

    That lasts until fewer unfinished series than workers remain: the (series - workers + 1)-th
    finished run (or the first, with fewer series than workers). Whole wall-clock seconds only.
    """
    from apps.jobs.models import Run

    finished = sorted(Run.objects.values_list("finished_at", flat=True))
    index = max(0, len(finished) - workers)
    end = finished[index].timestamp()
    seconds = range(math.ceil(started), math.floor(end))
    if len(seconds) < 2:
        return float("nan"), 0.0
    used = sum(fake.weight_per_second.get(second, 0) for second in seconds)
    return used / (SERVER_LIMIT * len(seconds) / 60), float(len(seconds))


def run_once(fake, symbols: list[str], since_ms: int, workers: int, prefetch: int) -> dict:
    from django.core.management import call_command

    from apps.connectors.models import Connector
    from apps.marketdata.models import Candle

    reset()
    Connector.objects.create(
        exchange_id="binance",
        options=fake.ccxt_options(timeout=30_000),
        rate_limit_weight_per_minute=5400,
        rate_limit_burst=300,
    )
    fake.reset()
    out = io.StringIO()
    with MemorySampler() as memory:
        started, started_wall = time.monotonic(), time.time()
        call_command(
            "backfill", "--exchange", "binance", "--symbol", ",".join(symbols), "--timeframe", "1m",
            "--since", str(since_ms), "--workers", str(workers), "--prefetch", str(prefetch), stdout=out, verbosity=0,
        )  # fmt: skip
        elapsed = time.monotonic() - started
    fake.refresh()
    candles = Candle.objects.count()
    weight = fake.counts["weight"]
    budget = SERVER_LIMIT * elapsed / 60
    # Whole clock minutes inside the run say most about the pace the limiter keeps.
    windows = sorted(fake.weight_per_minute.items())
    full = [used for _, used in windows[1:-1]] or [used for _, used in windows]
    busy_share, busy_seconds = all_busy_share(fake, started_wall, workers)
    return {
        "workers": workers,
        "seconds": elapsed,
        "candles": candles,
        "rate": candles / elapsed,
        "requests": fake.counts["requests"],
        "weight": weight,
        "share": weight / budget,
        "busy_share": busy_share,
        "busy_seconds": busy_seconds,
        "full_minutes": full,
        "peak_minute": max(used for _, used in windows),
        "429": fake.counts["429"],
        "418": fake.counts["418"],
        "memory": memory.quartiles_mb(),
    }


def main() -> None:
    days = float(os.environ.get("BENCH_BACKFILL_DAYS", "90"))
    symbol_count = int(os.environ.get("BENCH_BACKFILL_SYMBOLS", "5"))
    worker_counts = [int(w) for w in _env_list("BENCH_BACKFILL_WORKERS", "1,4")]
    scenarios = _env_list("BENCH_BACKFILL_SCENARIOS", "binance,budget")
    latency = float(os.environ.get("BENCH_BACKFILL_LATENCY_MS", "20"))
    prefetch = int(os.environ.get("BENCH_BACKFILL_PREFETCH", "2"))
    symbols = SYMBOLS[:symbol_count]

    with scratch_database():
        from apps.connectors import exchanges

        now_ms = int(time.time() * 1000) // MINUTE * MINUTE + 30_000
        since_ms = now_ms // MINUTE * MINUTE - int(days * DAY)
        listings = {symbol: since_ms - DAY for symbol in symbols}
        fake = RemoteFake(symbols=listings, now_ms=now_ms, weight_limit=SERVER_LIMIT, latency_ms=latency)
        original_profile = exchanges.PROFILES["binance"]
        print(
            f"{len(symbols)} symbols x {days:g} days of 1m = {len(symbols) * int(days * DAY // MINUTE):,} candles; "
            f"server: {latency:g} ms latency, {SERVER_LIMIT} weight per clock minute; bucket: 5,400/min + burst 300; "
            f"--prefetch {prefetch}"
        )
        try:
            for scenario in scenarios:
                page = 1000 if scenario == "binance" else 100
                exchanges.PROFILES["binance"] = dataclasses.replace(original_profile, page_limit=page)
                print(f"\n[{scenario}] pages of {page} candles, klines weight {original_profile.klines_weight}")
                print(
                    "workers  seconds  candles/s  requests  weight  share (whole run)  share (all workers busy)  "
                    "full minutes (weight)  429  418  RSS MB at 25/50/75/100%"
                )
                for workers in worker_counts:
                    r = run_once(fake, symbols, since_ms, workers, prefetch)
                    memory = "/".join(f"{mb:.0f}" for mb in r["memory"])
                    busy = f"{r['busy_share']:.0%} over {r['busy_seconds']:.0f}s" if r["busy_seconds"] else "-"
                    minutes = ",".join(str(used) for used in r["full_minutes"][:6]) or "-"
                    print(
                        f"{r['workers']:>7}  {r['seconds']:>7.1f}  {r['rate']:>9,.0f}  {r['requests']:>8}  "
                        f"{r['weight']:>6}  {r['share']:>17.0%}  {busy:>24}  {minutes:>21}  "
                        f"{r['429']:>3}  {r['418']:>3}  {memory}",
                        flush=True,
                    )
        finally:
            exchanges.PROFILES["binance"] = original_profile
            fake.stop()
            reset()


if __name__ == "__main__":
    main()
