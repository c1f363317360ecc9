"""Backfill throughput against the fake Binance: 5 symbols x 1 year of 1m candles (~2.6 million).

The real `manage.py backfill` (real ccxt, the shared PostgreSQL rate limiter, the embedded candle store
on PostgreSQL, indicators included) against tests/fakes/binance.py served from a separate process (so
the server's CPU and its share of the GIL do not slow the collector, nor its memory count as the
collector's): 20 ms latency per request and Binance's 6,000 weight per clock minute, with 429/418 when
exceeded. The connector's bucket is the collector.yaml default for Binance (5,400 per minute, burst 300).
The server makes and keeps every page of the range before any clock starts (FakeBinance.warm), so during
the runs it spends its CPU on HTTP only: it is test equipment sharing the machine's two cores.
Scenarios:
- "binance": Binance's real costs (klines weigh 2 and return 1,000 candles): the budget allows 50,000
  candles/s, the bucket 45,000/s;
- "budget": pages of 100 candles, so the shared limiter is what paces the run: this is where "share of
  the budget used" and "zero 429s" matter.

In the same run, the ceiling on this machine: a raw ccxt loop (`fetch_ohlcv`, one thread per symbol,
paced in process at the server's 6,000 weight/min, no burst) that stores nothing.

Figures: candles/s, weight used and its share of the server's budget (6,000/min) over the whole run and
over the part of it while every worker had a series to collect, the weight of each whole clock minute,
429/418 answers, resident memory at 25/50/75/100% of the run (flat = no growth with the range), and
where the CPU went: the collector's processes, the PostgreSQL backends of the scratch database (their
/proc CPU time, sampled), the fake server. With BENCH_BACKFILL_PROFILE=1 (one process only) every
thread of the collector is profiled on its own CPU clock and the CPU is split into parse, store,
indicators, rate limit, HTTP and the rest. Nothing is asserted. The ceiling and each run start at a
fresh clock minute, so none inherits weight an earlier one spent in the server's current minute; with
the fixed-window limiter a run may then spend up to a window's limit (5,700) as fast as it can, so
"share" over part of a run can exceed 100% while no clock minute exceeds 6,000.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dc_bench SECRET_KEY=x .venv/bin/python -m benchmarks backfill

A scratch database `<name>_bench_backfill` is created and dropped. Environment knobs:
BENCH_BACKFILL_DAYS (default 365), BENCH_BACKFILL_SYMBOLS (5), BENCH_BACKFILL_WORKERS ("5"),
BENCH_BACKFILL_PROCESSES ("1": backfill --processes, a list), BENCH_BACKFILL_SCENARIOS ("binance"),
BENCH_BACKFILL_LATENCY_MS (20), BENCH_BACKFILL_PREFETCH (backfill --prefetch, 2), BENCH_BACKFILL_CEILING
(1: run the raw ccxt loop), BENCH_BACKFILL_PROFILE (0).
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


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) from /proc; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class ServerCpuSampler:
    """CPU time of the PostgreSQL backends serving the scratch database (sampled every 0.25 s).

    Backends exit with their connections, so each one's CPU is sampled while it runs and its largest
    value kept; the last quarter second of a backend that exits is lost. Shared processes (WAL writer,
    checkpointer) serve every database on the server and are left out.
    """

    def __init__(self) -> None:
        from django.db import connections

        self._settings = connections["default"].settings_dict
        self.per_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        settings_dict = self._settings
        with psycopg.connect(
            host=settings_dict["HOST"] or "127.0.0.1",
            port=settings_dict["PORT"] or 5432,
            user=settings_dict["USER"] or "postgres",
            password=settings_dict["PASSWORD"] or None,
            dbname=settings_dict["NAME"],
            autocommit=True,
        ) as connection:
            own = connection.info.backend_pid
            while True:
                pids = [
                    pid
                    for (pid,) in connection.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    ).fetchall()
                    if pid != own
                ]
                for pid in pids:
                    self.per_pid[pid] = max(self.per_pid.get(pid, 0.0), process_cpu_seconds(pid))
                if self._stop.wait(0.25):
                    return

    def __enter__(self) -> "ServerCpuSampler":
        self._baseline = {}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def seconds(self) -> float:
        return sum(self.per_pid.values())


# Where the collector's CPU goes, by the cumulative CPU time of these functions (file suffix, name).
PROFILE_PARTS = [
    ("fetch: whole request (incl. the rest below)", "apps/connectors/exchanges.py", "fetch_ohlcv"),
    ("  rate limit (shared bucket, UPDATE ... RETURNING)", "apps/ratelimits/models.py", "acquire"),
    ("  HTTP (requests/urllib3)", "requests/sessions.py", "request"),
    ("  JSON decode of the answer", "json/__init__.py", "loads"),
    ("  ccxt parse_ohlcvs", "ccxt/base/exchange.py", "parse_ohlcvs"),
    ("clean_rows (checks, ascending, dedupe)", "apps/jobs/collect.py", "clean_rows"),
    ("store: upsert_candles", "apps/marketdata/store.py", "upsert_candles"),
    ("indicators: update_indicators", "apps/marketdata/indicators.py", "update_indicators"),
    ("gaps: sync_gaps", "apps/marketdata/gaps.py", "sync_gaps"),
    ("cursor UPDATE per page", "apps/jobs/collect.py", "_save_cursor"),
    ("run progress + heartbeat", "apps/jobs/collect.py", "_after_page"),
]


@contextlib.contextmanager
def profile_threads() -> Iterator[list]:
    """Profile every thread started inside the block (and this one) on its own CPU clock."""
    import cProfile

    profiles: list = []
    original_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.runcall(original_run, self)

    main = cProfile.Profile(time.thread_time)
    profiles.append(main)
    threading.Thread.run = run  # type: ignore[method-assign]
    main.enable()
    try:
        yield profiles
    finally:
        main.disable()
        threading.Thread.run = original_run  # type: ignore[method-assign]


def print_profile(profiles: list, wall: float) -> None:
    import pstats

    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        with contextlib.suppress(TypeError):  # a thread that never ran has no stats
            stats.add(profile)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in entries.values())
    print(f"  collector CPU profiled: {total:.1f}s over {wall:.1f}s wall ({total / wall:.2f} cores)")
    for label, suffix, name in PROFILE_PARTS:
        cumulative = sum(
            ct
            for (path, _, function), (_, _, _, ct, _) in entries.items()
            if function == name and path.endswith(suffix)
        )
        print(f"    {label:<52} {cumulative:7.1f}s  {cumulative / total:5.1%}")
    print("  top functions by own CPU time:")
    for (path, line, function), (_, calls, tt, ct, _) in sorted(entries.items(), key=lambda e: -e[1][2])[:15]:
        where = "/".join(path.split("/")[-2:])
        print(f"    {tt:7.2f}s own {ct:7.2f}s cum {calls:>9} calls  {where}:{line} {function}")


def ceiling(fake: "RemoteFake", symbols: list[str], since_ms: int, now_ms: int) -> dict:
    """A raw ccxt fetch loop that stores nothing: one thread per symbol, Binance's raw klines endpoint
    (`publicGetKlines`, no parse_ohlcv), paced in process at 99% of the server's weight per minute."""
    import ccxt

    weight_per_second = SERVER_LIMIT * 0.99 / 60
    lock = threading.Lock()
    next_at = [time.monotonic()]

    def pace(weight: int) -> None:
        with lock:
            at = max(next_at[0], time.monotonic())
            next_at[0] = at + weight / weight_per_second
        time.sleep(max(0.0, at - time.monotonic()))

    spot_only = {"fetchMarkets": {"types": ["spot"]}, "fetchMargins": False, "fetchCurrencies": False}
    first = ccxt.binance(fake.ccxt_options(timeout=30_000, options=spot_only))
    first.load_markets()
    candles = [0] * len(symbols)
    end = now_ms // MINUTE * MINUTE - MINUTE

    def loop(index: int, symbol: str) -> None:
        client = ccxt.binance(fake.ccxt_options(timeout=30_000, options=spot_only))
        client.set_markets(first.markets)
        since = since_ms
        while since <= end:
            pace(2)
            rows = client.publicGetKlines(
                {"symbol": client.market_id(symbol), "interval": "1m", "startTime": since, "limit": 1000}
            )
            rows = [row for row in rows if int(row[0]) <= end]
            if not rows:
                break
            candles[index] += len(rows)
            since = int(rows[-1][0]) + MINUTE

    fresh_minute()
    fake.reset()
    cpu, fake_cpu = time.process_time(), process_cpu_seconds(fake.pid)
    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i, symbol)) for i, symbol in enumerate(symbols)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    fake.refresh()
    return {
        "seconds": elapsed,
        "candles": sum(candles),
        "rate": sum(candles) / elapsed,
        "share": fake.counts["weight"] / (SERVER_LIMIT * elapsed / 60),
        "429": fake.counts["429"],
        "cpu": time.process_time() - cpu,
        "fake_cpu": process_cpu_seconds(fake.pid) - fake_cpu,
    }


def _serve_fake(control, kwargs: dict) -> None:
    """The child process: serve a FakeBinance and answer the parent's requests for its counters."""
    from tests.fakes.binance import FakeBinance

    fake = FakeBinance(**kwargs).start()
    control.send(fake.url)
    while True:
        command = control.recv()
        if isinstance(command, tuple) and command[0] == "warm":
            _, symbols, interval, start = command
            control.send(sum(fake.warm(symbol, interval, start) for symbol in symbols))
        elif command == "reset":
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
        self.pid: int = self._process.pid or 0
        self.counts: dict[str, int] = {}
        self.weight_per_minute: dict[int, int] = {}
        self.weight_per_second: dict[int, int] = {}

    def ccxt_options(self, **extra: object) -> dict:
        api = f"{self.url}/api/v3"
        return {"urls": {"api": {"public": api, "private": api, "v1": f"{self.url}/api/v1"}}, **extra}

    def warm(self, symbols: list[str], interval: str, start: int) -> int:
        """Have the server make (and keep) the pages of the range now, before any clock starts."""
        self._control.send(("warm", symbols, interval, start))
        return self._control.recv()

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


def fresh_minute() -> None:
    """Wait for the next clock minute: the server counts weight per clock minute (as Binance does), so a
    run started in the minute an earlier run (or the ceiling) spent weight in would find that weight
    gone and wait for the next minute, a pause that says nothing about the run itself."""
    time.sleep(60 - time.time() % 60 + 0.05)


def run_once(
    fake, symbols: list[str], since_ms: int, workers: int, prefetch: int, processes: int, profile: bool
) -> dict:
    import resource

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
    fresh_minute()
    fake.reset()
    out = io.StringIO()
    args = [
        "backfill", "--exchange", "binance", "--symbol", ",".join(symbols), "--timeframe", "1m",
        "--since", str(since_ms), "--workers", str(workers), "--prefetch", str(prefetch),
    ]  # fmt: skip
    if processes > 1:
        args += ["--processes", str(processes)]
    cpu, children = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    fake_cpu = process_cpu_seconds(fake.pid)
    profiled = contextlib.nullcontext([]) if not profile else profile_threads()
    with MemorySampler() as memory, ServerCpuSampler() as server, profiled as profiles:
        started, started_wall = time.monotonic(), time.time()
        call_command(*args, stdout=out, verbosity=0)
        elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
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
        "cpu": time.process_time() - cpu + children_cpu,
        "server_cpu": server.seconds(),
        "fake_cpu": process_cpu_seconds(fake.pid) - fake_cpu,
        "profiles": profiles,
        "timeline": timeline(fake.weight_per_second, started_wall, started_wall + elapsed),
    }


def timeline(per_second: dict[int, int], start: float, end: float, width: int = 10) -> str:
    """Weight the server counted in each `width` seconds of the run: where the budget went unused."""
    first = math.floor(start)
    buckets = [0] * (math.floor(end) // width - first // width + 1)
    for second, used in per_second.items():
        if first <= second <= end:
            buckets[second // width - first // width] += used
    return ",".join(str(used) for used in buckets)


def main() -> None:
    days = float(os.environ.get("BENCH_BACKFILL_DAYS", "365"))
    symbol_count = int(os.environ.get("BENCH_BACKFILL_SYMBOLS", "5"))
    worker_counts = [int(w) for w in _env_list("BENCH_BACKFILL_WORKERS", "5")]
    process_counts = [int(p) for p in _env_list("BENCH_BACKFILL_PROCESSES", "1")]
    scenarios = _env_list("BENCH_BACKFILL_SCENARIOS", "binance")
    latency = float(os.environ.get("BENCH_BACKFILL_LATENCY_MS", "20"))
    prefetch = int(os.environ.get("BENCH_BACKFILL_PREFETCH", "2"))
    with_ceiling = os.environ.get("BENCH_BACKFILL_CEILING", "1") == "1"
    profile = os.environ.get("BENCH_BACKFILL_PROFILE", "0") == "1"
    symbols = SYMBOLS[:symbol_count]

    with scratch_database():
        from apps.connectors import exchanges

        now_ms = int(time.time() * 1000) // MINUTE * MINUTE + 30_000
        since_ms = now_ms // MINUTE * MINUTE - int(days * DAY)
        listings = {symbol: since_ms - DAY for symbol in symbols}
        fake = RemoteFake(symbols=listings, now_ms=now_ms, weight_limit=SERVER_LIMIT, latency_ms=latency)
        original_profile = exchanges.PROFILES["binance"]
        warming = time.monotonic()
        pages = fake.warm(symbols, "1m", since_ms)
        print(
            f"the fake server made the range's {pages:,} pages in {time.monotonic() - warming:.1f}s (not timed below)"
        )
        print(
            f"{len(symbols)} symbols x {days:g} days of 1m = {len(symbols) * int(days * DAY // MINUTE):,} candles; "
            f"server: {latency:g} ms latency, {SERVER_LIMIT} weight per clock minute; bucket: 5,400/min + burst 300; "
            f"--prefetch {prefetch}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )
        try:
            if with_ceiling:
                c = ceiling(fake, symbols, since_ms, now_ms)
                print(
                    f"\n[ceiling] raw ccxt loop (publicGetKlines, {len(symbols)} threads, stores nothing): "
                    f"{c['candles']:,} candles in {c['seconds']:.1f}s = {c['rate']:,.0f}/s, {c['share']:.0%} of the "
                    f"budget, {c['429']} x 429; CPU: loop {c['cpu']:.1f}s, fake server {c['fake_cpu']:.1f}s",
                    flush=True,
                )
            for scenario in scenarios:
                page = 1000 if scenario == "binance" else 100
                exchanges.PROFILES["binance"] = dataclasses.replace(original_profile, page_limit=page)
                print(f"\n[{scenario}] pages of {page} candles, klines weight {original_profile.klines_weight}")
                print(
                    "procs  workers  seconds  candles/s  requests  weight  share (whole run)  share (all busy)  "
                    "full minutes (weight)  429  418  RSS MB at 25/50/75/100%  CPU s: collector/PostgreSQL/fake"
                )
                for processes in process_counts:
                    for workers in worker_counts:
                        r = run_once(fake, symbols, since_ms, workers, prefetch, processes, profile and processes == 1)
                        memory = "/".join(f"{mb:.0f}" for mb in r["memory"])
                        busy = f"{r['busy_share']:.0%} over {r['busy_seconds']:.0f}s" if r["busy_seconds"] else "-"
                        minutes = ",".join(str(used) for used in r["full_minutes"][:6]) or "-"
                        print(
                            f"{processes:>5}  {r['workers']:>7}  {r['seconds']:>7.1f}  {r['rate']:>9,.0f}  "
                            f"{r['requests']:>8}  {r['weight']:>6}  {r['share']:>17.0%}  {busy:>16}  {minutes:>21}  "
                            f"{r['429']:>3}  {r['418']:>3}  {memory:>23}  "
                            f"{r['cpu']:.1f}/{r['server_cpu']:.1f}/{r['fake_cpu']:.1f}",
                            flush=True,
                        )
                        print(f"       weight per 10 s (budget 1,000): {r['timeline']}")
                        if r["profiles"]:
                            print_profile(r["profiles"], r["seconds"])
        finally:
            exchanges.PROFILES["binance"] = original_profile
            fake.stop()
            reset()


if __name__ == "__main__":
    main()
