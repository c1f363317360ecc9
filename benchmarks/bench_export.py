"""Export throughput and memory: N stored 1m candles of one series written to Parquet and to CSV.

Runs against the embedded store on PostgreSQL, in a database of its own beside DATABASE_URL's
(BENCH_EXPORT_DATABASE, default dc_bench_export) that is kept between runs: the candles are loaded once
with one `INSERT ... SELECT generate_series` (a random walk computed by PostgreSQL, no Python per candle)
and reused while the series holds exactly BENCH_EXPORT_CANDLES (default 10,000,000) candles.

Each format is exported the way a `run_scheduler` worker does it: `exports.request_export` queues the
export task, and a child process (a fresh interpreter, so its peak RSS is the export's own) claims it
with `Task.objects.claim` and runs it with `apps.jobs.tasks.run_task`, into a temporary EXPORT_DIR. The
child reports the wall time of `run_task`, the rows and bytes written, its CPU time (and the kernel's
share of it: writing a 1 GB file costs about 2 s of it on a small VM), the PostgreSQL backend's CPU time
(from /proc, when the server is local) and its peak RSS (ru_maxrss), before the export (interpreter,
Django, pyarrow: the floor) and at the end; and the load average as each format ends.

Goals: >= 1,000,000 candles/s and peak RSS < 300 MB for each format. Figures are for comparison
between runs on the same machine; never asserted. BENCH_EXPORT_PROFILE=1 prints the child's cProfile
(top functions by own time) of its main thread, which reads from the store: the writer thread's
formatting shows there only as the main thread's wait for it.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/datacollector python -m benchmarks export
    BENCH_EXPORT_CANDLES=1000000 python -m benchmarks export          # a quicker run (reloads the series)
    BENCH_EXPORT_FORMATS=parquet BENCH_EXPORT_PROFILE=1 python -m benchmarks export
    BENCH_EXPORT_FORMATS=parquet,csv,json python -m benchmarks export   # JSON Lines as well (2 GB)
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.scratch import DEFAULT_DATABASE_URL

TOTAL = int(os.environ.get("BENCH_EXPORT_CANDLES", "10000000"))
DATABASE = os.environ.get("BENCH_EXPORT_DATABASE", "dc_bench_export")
FORMATS = os.environ.get("BENCH_EXPORT_FORMATS", "parquet,csv").split(",")
PROFILE = os.environ.get("BENCH_EXPORT_PROFILE", "") not in ("", "0")
T0 = 946_684_800_000  # 2000-01-01 00:00 UTC: 10 million minutes later is 2019, all long closed
MINUTE = 60_000
SERIES = ("binance", "BTC/USDT", "1m")


def database_url() -> str:
    base = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    return urlsplit(base)._replace(path=f"/{DATABASE}").geturl()


def setup_django() -> None:
    os.environ["DATABASE_URL"] = database_url()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["MONGODB_URI"] = ""  # the embedded store, whatever the environment says
    import django

    django.setup()


def ensure_database() -> None:
    """Create the benchmark's database unless it exists (it is kept between runs)."""
    import environ
    import psycopg

    config = environ.Env.db_url_config(database_url())
    if "postgresql" not in config["ENGINE"]:
        raise SystemExit(f"benchmark export needs DATABASE_URL to point at PostgreSQL, not {config['ENGINE']}")
    admin = {
        "host": config["HOST"] or "127.0.0.1",
        "port": config["PORT"] or 5432,
        "user": config["USER"] or "postgres",
        "password": config["PASSWORD"] or None,
        "dbname": "postgres",
        "autocommit": True,
    }
    with psycopg.connect(**admin) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE]).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')


def ensure_candles() -> None:
    """Load TOTAL 1m candles of SERIES unless the series already holds exactly those."""
    from django.db import connection

    from apps.marketdata.models import Candle

    table = Candle._meta.db_table
    where = "exchange_id = %s AND symbol = %s AND timeframe = %s"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*), min(ts), max(ts) FROM {table} WHERE {where}", SERIES)
        count, first, last = cursor.fetchone()
        if (count, first, last) == (TOTAL, T0, T0 + (TOTAL - 1) * MINUTE):
            print(f"  (reusing {TOTAL:,} stored candles in {DATABASE})", flush=True)
            return
        started = time.perf_counter()
        cursor.execute(f"DELETE FROM {table} WHERE {where}", SERIES)
        # A random walk in SQL: each close is the previous times exp(noise), via a running sum of logs.
        cursor.execute(
            f"""
            INSERT INTO {table} (exchange_id, symbol, timeframe, ts, open, high, low, close, volume)
            SELECT %s, %s, %s, %s + i * %s, c, c * 1.0005, c * 0.9995, c, 1 + (i %% 97)
            FROM (
                SELECT i, 30000 * exp(sum((random() - 0.5) * 0.002) OVER (ORDER BY i)) AS c
                FROM generate_series(0::bigint, %s::bigint - 1) AS i
            ) AS walk
            """,
            [*SERIES, T0, MINUTE, TOTAL],
        )
        cursor.execute(f"VACUUM ANALYZE {table}")  # autocommit: the visibility map and statistics, once
    print(f"  (stored {TOTAL:,} candles in {time.perf_counter() - started:.1f}s; not part of the figures)", flush=True)


def backend_cpu(connection) -> float | None:
    """CPU seconds of the PostgreSQL backend serving `connection` (readable when the server is local)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [pid] = cursor.fetchone()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(export_id: int) -> None:
    """Claim and run the export's task as a scheduler worker does; print the figures as one JSON line."""
    setup_django()
    from django.db import connection

    from apps.jobs.models import Task
    from apps.jobs.tasks import run_task
    from apps.marketdata import exports
    from apps.marketdata.models import Export

    exports.series_tables  # noqa: B018 - imported (pyarrow and all) before the floor is read
    connection.ensure_connection()
    start = resource.getrusage(resource.RUSAGE_SELF)
    floor_kb = start.ru_maxrss
    server, cpu, wall = backend_cpu(connection), time.process_time(), time.perf_counter()
    task = Task.objects.claim("bench-export", lease_seconds=600, kinds=[Task.Kind.EXPORT])
    if PROFILE:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        status = profiler.runcall(run_task, task)
    else:
        status = run_task(task)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    end = resource.getrusage(resource.RUSAGE_SELF)
    kernel, faults = end.ru_stime - start.ru_stime, end.ru_minflt - start.ru_minflt
    server_after = backend_cpu(connection)
    export = Export.objects.select_related("task").get(pk=export_id)
    if PROFILE:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(18)
    print(
        json.dumps(
            {
                "status": status,
                "error": export.task.error,
                "rows": export.rows,
                "size": export.size,
                "wall": wall,
                "cpu": cpu,
                "kernel_cpu": kernel,
                "page_faults": faults,
                "server_cpu": None if server is None or server_after is None else server_after - server,
                "floor_mb": floor_kb / 1024,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        ),
        flush=True,
    )


def run_format(format: str, export_dir: str) -> None:
    from apps.marketdata import exports

    export = exports.request_export(exchange_id=SERIES[0], symbols=[SERIES[1]], timeframes=[SERIES[2]], format=format)
    env = {**os.environ, "DATABASE_URL": database_url(), "EXPORT_DIR": export_dir, "EXPORT_MAX_ROWS": str(TOTAL)}
    command = [sys.executable, "-m", "benchmarks.bench_export", "child", str(export.pk)]
    completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if completed.returncode != 0 or not completed.stdout.strip():
        print(f"  {format:<8} the child failed (exit {completed.returncode})", flush=True)
        return
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    if figures["status"] != "succeeded":
        print(f"  {format:<8} {figures['status']}: {figures['error']}", flush=True)
        return
    server = "n/a" if figures["server_cpu"] is None else f"{figures['server_cpu']:.1f}s"
    print(
        f"  {format:<8} {figures['rows']:,} candles in {figures['wall']:.2f}s = "
        f"{figures['rows'] / figures['wall']:,.0f} candles/s; {figures['size'] / 1e6:,.0f} MB file; "
        f"CPU: worker {figures['cpu']:.1f}s (kernel {figures['kernel_cpu']:.1f}s, "
        f"{figures['page_faults']:,} page faults), PostgreSQL {server}; "
        f"peak RSS {figures['peak_mb']:.0f} MB (floor before the export {figures['floor_mb']:.0f} MB); "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for path in Path(export_dir).rglob("*"):
        if path.is_file():
            path.unlink()


def main() -> None:
    ensure_database()
    setup_django()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    print(f"machine: {os.cpu_count()} CPUs, shared with other work; load average {os.getloadavg()[0]:.1f}")
    print(f"embedded store on PostgreSQL, database {DATABASE}; one series of {TOTAL:,} 1m candles:", flush=True)
    ensure_candles()
    print("  goals: >= 1,000,000 candles/s and peak RSS < 300 MB per format", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as export_dir:
        for format in FORMATS:
            run_format(format.strip(), export_dir)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(int(sys.argv[2]))
    else:
        sys.exit(main())
