"""CPU cost of ingesting 1,000,000 candles: parse Binance klines with ccxt, then upsert into the store.

Runs against the embedded store on PostgreSQL (a scratch database created from DATABASE_URL and dropped
afterwards) and, when MONGODB_URI is set, against MongoDB (a scratch database, dropped afterwards).
Three passes over the same series: first ingest (all inserts), the same data again (all unchanged,
what a re-fetched range costs), and every candle revised (all updates).

On PostgreSQL the same passes run side by side, each on its own series, for the store's upsert and two
reference implementations of it kept here (BENCH_INGEST_PATHS=store,lists,copy picks some):
  store  the store as it is: six numpy-encoded binary arrays through unnest() in one INSERT ... ON CONFLICT
  lists  the same statement with the arrays passed as Python lists (psycopg adapts each element)
  copy   COPY (binary) into a temporary staging table, then one INSERT ... SELECT ... ON CONFLICT

Reported per pass: candles/s (wall clock), this process's CPU seconds (time.process_time), and for
PostgreSQL the CPU seconds of the server backend serving our connection (from /proc, so only when the
server runs on this machine; background writers and checkpoints are not included). Figures are for
comparison between runs on the same machine; they are never asserted.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/datacollector python -m benchmarks ingest
    BENCH_INGEST_CANDLES=200000 python -m benchmarks.bench_ingest    # a quicker run
"""

import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.scratch import DEFAULT_DATABASE_URL, scratch_database

TOTAL = int(os.environ.get("BENCH_INGEST_CANDLES", "1000000"))
PAGE = 1_000  # Binance's klines page size: the unit collection parses and upserts.
T0 = 1_577_836_800_000  # 2020-01-01 00:00 UTC
MINUTE = 60_000
SERIES = ("binance", "BTC/USDT", "1m")


def kline_pages(total: int, revision: float = 0.0) -> Iterator[bytes]:
    """JSON bodies as /api/v3/klines returns them (prices as strings, 12 fields), PAGE candles each."""
    for page_start in range(0, total, PAGE):
        rows = []
        for i in range(page_start, min(page_start + PAGE, total)):
            ts = T0 + i * MINUTE
            price = 30_000 + (i * 7919 % 10_007) / 100
            rows.append(
                [
                    ts,
                    f"{price:.2f}",
                    f"{price + 12.5:.2f}",
                    f"{price - 11.25:.2f}",
                    f"{price + 3.75 + revision:.2f}",
                    f"{(i % 977) / 10:.5f}",
                    ts + MINUTE - 1,
                    "1519159.78",
                    1271,
                    "20.0",
                    "840000.0",
                    "0",
                ]
            )
        yield json.dumps(rows).encode()


def postgres_backend_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of a local PostgreSQL backend process, or None when not readable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pass(label: str, pages: list[bytes], server_cpu: Callable[[], float | None], symbol: str) -> None:
    import ccxt

    from apps.marketdata import store

    exchange = ccxt.binance()
    parse_cpu = 0.0
    totals = store.UpsertResult(0, 0, 0)
    server_before = server_cpu()
    wall, cpu = time.perf_counter(), time.process_time()
    for body in pages:
        started = time.process_time()
        candles = exchange.parse_ohlcvs(json.loads(body), None, SERIES[2], None, None)
        parse_cpu += time.process_time() - started
        totals += store.upsert_candles(SERIES[0], symbol, SERIES[2], candles)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server_after = server_cpu()
    count = sum(totals)
    server = "n/a" if server_before is None or server_after is None else f"{server_after - server_before:6.1f}s"
    print(
        f"  {label:<22} {count / wall:>9,.0f} candles/s  wall {wall:6.1f}s  client CPU {cpu:6.1f}s "
        f"(parse {parse_cpu:4.1f}s, store {cpu - parse_cpu:5.1f}s)  server CPU {server}  "
        f"inserted {totals.inserted:,} updated {totals.updated:,} unchanged {totals.unchanged:,}",
        flush=True,
    )


def run_passes(server_cpu: Callable[[], float | None], symbol: str = SERIES[1]) -> None:
    # Request bodies are built before timing: the benchmark measures our side, not the fake exchange.
    original = list(kline_pages(TOTAL))
    revised = list(kline_pages(TOTAL, revision=0.01))
    run_pass("insert", original, server_cpu, symbol)
    run_pass("re-upsert (unchanged)", original, server_cpu, symbol)
    run_pass("revise (all updated)", revised, server_cpu, symbol)


_DIFFERS = " OR ".join(f"c.{f} <> EXCLUDED.{f}" for f in ("open", "high", "low", "close", "volume"))
_UPSERT_FROM = """
    WITH written AS (
        INSERT INTO marketdata_candle AS c (exchange_id, symbol, timeframe, ts, open, high, low, close, volume)
        SELECT %s, %s, %s, r.* FROM {source}
        ON CONFLICT (exchange_id, symbol, timeframe, ts) DO UPDATE SET
            open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
            close = EXCLUDED.close, volume = EXCLUDED.volume
        WHERE {differs}
        RETURNING (c.xmax = 0) AS inserted
    )
    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written
"""


def lists_upsert(exchange_id: str, symbol: str, timeframe: str, rows: list[tuple]) -> tuple[int, int, int]:
    """Reference: the store's statement with the six arrays passed as Python lists (%b, binary)."""
    import psycopg
    from django.db import connection

    source = "unnest(%b::bigint[], %b::float8[], %b::float8[], %b::float8[], %b::float8[], %b::float8[]) AS r"
    sql = _UPSERT_FROM.format(source=source, differs=_DIFFERS)
    inserted = updated = 0
    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:
        for start in range(0, len(rows), 5_000):
            batch = rows[start : start + 5_000]
            columns = [list(column) for column in zip(*batch, strict=True)]
            cursor.execute(sql, [exchange_id, symbol, timeframe, *columns], prepare=False)
            batch_inserted, batch_updated = cursor.fetchone()
            inserted, updated = inserted + batch_inserted, updated + batch_updated
    return inserted, updated, len(rows) - inserted - updated


_COPY_RECORD = struct.Struct(">hiqididididid")  # 6 fields: (length, value) each, in COPY's binary format


def copy_upsert(exchange_id: str, symbol: str, timeframe: str, rows: list[tuple]) -> tuple[int, int, int]:
    """Reference: COPY the rows (binary) into a temporary staging table, then one INSERT ... SELECT from it."""
    import psycopg
    from django.db import connection, transaction

    sql = _UPSERT_FROM.format(source="candle_staging AS r", differs=_DIFFERS)
    connection.ensure_connection()
    with transaction.atomic(), psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS candle_staging (ts bigint, open float8, high float8, low float8, "
            "close float8, volume float8) ON COMMIT DELETE ROWS"
        )
        body = bytearray(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
        for ts, o, h, lo, c, v in rows:
            body += _COPY_RECORD.pack(6, 8, ts, 8, o, 8, h, 8, lo, 8, c, 8, v)
        body += b"\xff\xff"
        with cursor.copy("COPY candle_staging FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(bytes(body))
        cursor.execute(sql, [exchange_id, symbol, timeframe], prepare=False)
        inserted, updated = cursor.fetchone()
    return inserted, updated, len(rows) - inserted - updated


UPSERT_PATHS = {"store": None, "lists": lists_upsert, "copy": copy_upsert}


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")
    os.environ.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
    import django

    django.setup()


def bench_postgres() -> None:
    from django.db import connection

    with scratch_database("ingest") as name:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            [pid] = cursor.fetchone()
        from apps.marketdata import sqlstore

        store_upsert = sqlstore._postgres_upsert
        paths = os.environ.get("BENCH_INGEST_PATHS", ",".join(UPSERT_PATHS)).split(",")
        for path in paths:
            print(f"embedded store on PostgreSQL, upsert path {path!r} ({TOTAL:,} candles, scratch database {name}):")
            sqlstore._postgres_upsert = UPSERT_PATHS[path] or store_upsert
            try:
                run_passes(lambda: postgres_backend_cpu(pid), symbol=f"{path.upper()}/USDT")
            finally:
                sqlstore._postgres_upsert = store_upsert
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size('marketdata_candle')")
            [size] = cursor.fetchone()
        candles = TOTAL * len(paths)
        print(f"  table + indexes: {size / 2**20:,.0f} MiB ({size / candles:.0f} bytes per candle)", flush=True)


def bench_mongo() -> None:
    from django.conf import settings

    from apps.marketdata import mongostore, store

    original = settings.MONGODB_DATABASE
    settings.MONGODB_DATABASE = f"bench_ingest_{os.getpid()}"
    store.reset_mongo_client()
    try:
        print(f"MongoDB ({TOTAL:,} candles, scratch database {settings.MONGODB_DATABASE}):", flush=True)
        run_passes(lambda: None)
        stats = mongostore.get_db().command("collStats", mongostore.CANDLES)
        size = stats.get("storageSize", 0) + stats.get("totalIndexSize", 0)
        print(f"  storage + indexes: {size / 2**20:,.0f} MiB ({size / TOTAL:.0f} bytes per candle)", flush=True)
    finally:
        mongostore.get_client().drop_database(settings.MONGODB_DATABASE)
        store.reset_mongo_client()
        settings.MONGODB_DATABASE = original


def main() -> None:
    setup_django()
    print(f"machine: {os.cpu_count()} CPUs, shared with other work; load average {os.getloadavg()[0]:.1f}")
    bench_postgres()
    if os.environ.get("MONGODB_URI"):
        bench_mongo()
    else:
        print("MongoDB: skipped (set MONGODB_URI to measure it)")


if __name__ == "__main__":
    sys.exit(main())
