"""The series store on the Django database: candles in `Candle`, indicator rows in `IndicatorRow`.

One of the store's two backends (the other is mongostore.py, with the same functions); only
`apps.marketdata.store` calls it. Rows arrive validated and sorted (store.normalize_candles); results
are plain tuples that the store wraps in its own types.

PostgreSQL (production and tests) takes the fast paths: rows travel as PostgreSQL binary arrays that
numpy encodes in one go, bound by a plain psycopg cursor on Django's connection (so inside any
transaction Django has open). Django's cursors bind client-side (every number becomes SQL text in
Python), and psycopg adapts a list element by element; either was most of the client's CPU of an
ingest. SQLite (the default database of `make run`) and any other database take portable paths.
"""

import contextlib
import dataclasses
import functools
import sqlite3
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
import psycopg.adapt
import psycopg.errors
import psycopg.pq
from django.db import connection, models, transaction
from django.db.models import Count, F, Max, Min, Value
from django.db.models.functions import Greatest, Least
from django.utils import timezone

from apps.marketdata.models import Anomaly, Candle, IndicatorRow, SeriesStatistics, unpack_values

VALUE_FIELDS = ("open", "high", "low", "close", "volume")

# Rows per statement. PostgreSQL takes a batch as a few binary arrays, so bigger batches only cost
# memory; SQLite caps the parameters of one statement (SQLITE_LIMIT_VARIABLE_NUMBER).
POSTGRES_BATCH = 5_000
SQL_BATCH = 1_000
INDICATOR_SQL_BATCH = 500


def _batches(rows: list, size: int) -> Iterator[list]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _series(
    model: type[models.Model],
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
) -> models.QuerySet:
    """The rows of one series in `model`'s table, `ts` bounds inclusive."""
    queryset = model.objects.filter(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe)
    if start_ts is not None:
        queryset = queryset.filter(ts__gte=start_ts)
    if end_ts is not None:
        queryset = queryset.filter(ts__lte=end_ts)
    return queryset


def _psycopg_cursor() -> psycopg.Cursor:
    connection.ensure_connection()
    cursor = psycopg.Cursor(connection.connection)
    cursor.adapters.register_dumper(BinaryArray, _BinaryArrayDumper)
    return cursor


# --- Candles: writes --------------------------------------------------------------------------------


def upsert_candles(
    exchange_id: str, symbol: str, timeframe: str, rows: list[tuple], flagged: list[tuple]
) -> tuple[int, int, int]:
    """(inserted, updated, unchanged) after storing sorted, distinct, valid rows.

    `flagged` are the rows' OHLC anomalies (store.ohlc_anomalies). Each batch also brings the series'
    anomalies and statistics up to date, in the batch's transaction.
    """
    if connection.vendor == "postgresql":
        return _postgres_upsert(exchange_id, symbol, timeframe, rows, flagged)
    if connection.vendor == "sqlite" and sqlite3.sqlite_version_info >= (3, 35, 0):
        return _sqlite_upsert(exchange_id, symbol, timeframe, rows, flagged)
    return orm_upsert(exchange_id, symbol, timeframe, rows, flagged)


def _flagged_in(flagged: list[tuple], batch: list[tuple]) -> list[tuple]:
    """The anomalies of one batch (flagged rows are few, usually none)."""
    if not flagged:
        return []
    first, last = batch[0][0], batch[-1][0]
    return [row for row in flagged if first <= row[0] <= last]


def _record_statistics(
    exchange_id: str, symbol: str, timeframe: str, first: int, last: int, inserted: int, anomalies: int
) -> None:
    """The portable statistics update of one written batch (PostgreSQL does it inside the batch's statement).

    Runs in the batch's transaction; SQLite's writes are serialised (IMMEDIATE), so the update-or-create
    cannot race there.
    """
    updated = SeriesStatistics.objects.filter(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe).update(
        first_ts=Least("first_ts", Value(first)),
        last_ts=Greatest("last_ts", Value(last)),
        candles=F("candles") + inserted,
        anomalies=F("anomalies") + anomalies,
        last_collected_at=timezone.now(),
    )
    if not updated:
        SeriesStatistics.objects.create(
            exchange_id=exchange_id,
            symbol=symbol,
            timeframe=timeframe,
            first_ts=first,
            last_ts=last,
            candles=inserted,
            anomalies=anomalies,
            last_collected_at=timezone.now(),
        )


_CANDLE_COLUMNS = np.dtype([("ts", "i8"), *((field, "f8") for field in VALUE_FIELDS)])


def _postgres_upsert(
    exchange_id: str, symbol: str, timeframe: str, rows: list[tuple], flagged: list[tuple]
) -> tuple[int, int, int]:
    """Per batch: a plain INSERT when the series holds nothing in the batch's ts range, else the upsert.

    Rows pass as six binary arrays through unnest(). Collection mostly writes ranges it has never
    written (history pages, each new candle), and a plain INSERT costs PostgreSQL about half the CPU of
    INSERT ... ON CONFLICT ... RETURNING (speculative insertion, the returned rows counted in a CTE);
    benchmarks/bench_backfill.py measures it. The INSERT carries the emptiness check (an uncorrelated
    NOT EXISTS, evaluated once: one probe of the unique index) and inserts nothing when the range holds
    a candle; the upsert then settles the batch. Should another writer insert into the range between
    the check and the insert, the unique key refuses the batch and the upsert settles it too.

    The upsert's WHERE on DO UPDATE skips rows whose values are all equal, so an identical candle writes
    no new row version (no dead tuple, no index entries; PostgreSQL only locks the row) and is not
    returned. A returned row is new when its xmax is 0, while an updated row carries the locking
    transaction's id there: an implementation detail, but a long-standing and widely relied-on one, and
    the contract tests check the counts. unchanged = batch size - returned rows.

    COPY into a temporary staging table and one INSERT ... SELECT from it was measured against this
    (benchmarks/bench_ingest.py prints both): it needs as little client CPU, but the staging table's
    truncation at each commit costs the server more than unnest() of bound arrays, for the 1,000-candle
    pages collection writes.

    Both statements also carry the batch's bookkeeping as further common table expressions: the upsert
    of the series' statistics row, the anomalies of the batch (only when it has some) and, in the upsert,
    the removal of anomalies of revised candles that are fine now. So the statistics commit with the
    candles, in the same round trip, and a refused INSERT refuses them too.
    """
    inserted = updated = 0
    series = [exchange_id, symbol, timeframe]
    with _psycopg_cursor() as cursor:
        for batch in _batches(rows, POSTGRES_BATCH):
            columns = np.array(batch, dtype=_CANDLE_COLUMNS)
            ts = BinaryArray.int8(columns["ts"])
            arrays = [ts] + [BinaryArray.float8(columns[f]) for f in VALUE_FIELDS]
            bounds = [batch[0][0], batch[-1][0]]
            now = timezone.now()
            anomalies = _flagged_in(flagged, batch)
            anomaly_arrays = [list(column) for column in zip(*anomalies, strict=True)] if anomalies else [[], []]
            anomaly_params = [*series, *anomaly_arrays] if anomalies else []
            try:
                # Inside a caller's transaction a refused INSERT must be rolled back to a savepoint; in
                # autocommit it is a transaction of its own (BEGIN and COMMIT would cost a round trip each).
                with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
                    # No server-side prepared statement: they break behind a transaction-pooling pgbouncer.
                    cursor.execute(
                        _postgres_statement(fresh=True, anomalies=bool(anomalies)),
                        [*series, *bounds, *series, *arrays, *anomaly_params, *series, *bounds, len(batch), now],
                        prepare=False,
                    )
                    (fresh,) = cursor.fetchone()
            except psycopg.errors.UniqueViolation:
                fresh = False
            if fresh:
                inserted += len(batch)
                continue
            cursor.execute(
                _postgres_statement(fresh=False, anomalies=bool(anomalies)),
                [*series, *arrays, *series, *bounds, ts, *anomaly_arrays[:2], *anomaly_params, *series, *bounds, now],
                prepare=False,
            )
            batch_inserted, batch_updated = cursor.fetchone()
            inserted, updated = inserted + batch_inserted, updated + batch_updated
    return inserted, updated, len(rows) - inserted - updated


_UNNEST_ROWS = """
    SELECT %s, %s, %s, r.* FROM unnest(
        %s::bigint[], %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[]
    ) AS r
"""
_CANDLES = Candle._meta.db_table
_ANOMALIES = Anomaly._meta.db_table
_STATISTICS = SeriesStatistics._meta.db_table
_ANOMALY_VALUES = ("open", "high", "low", "close")


@functools.cache
def _postgres_statement(fresh: bool, anomalies: bool) -> str:
    """The batch statement: the fresh INSERT or the upsert, with its anomalies and statistics (see
    _postgres_upsert). Parameters, in order: fresh: series and bounds (the emptiness check), series and
    the six arrays, [series and the anomaly arrays], series, bounds, the batch size and the time; upsert:
    series and the six arrays, series, bounds, the ts array and the anomalies' ts and kinds (the removal
    of fixed ones), [series and the anomaly arrays], series, bounds and the time."""
    anomaly_insert = f"""
        anomalies AS (
            INSERT INTO {_ANOMALIES} AS a
                (exchange_id, symbol, timeframe, ts, kind, open, high, low, close, detected_at)
            SELECT %s, %s, %s, f.*, now()
            FROM unnest(%s::bigint[], %s::text[], %s::float8[], %s::float8[], %s::float8[], %s::float8[]) AS f
            {"WHERE (SELECT ok FROM fresh)" if fresh else ""}
            ON CONFLICT (exchange_id, symbol, timeframe, ts, kind) DO UPDATE SET
                {", ".join(f"{f} = EXCLUDED.{f}" for f in _ANOMALY_VALUES)}
            WHERE ({", ".join(f"a.{f}" for f in _ANOMALY_VALUES)})
                IS DISTINCT FROM ({", ".join(f"EXCLUDED.{f}" for f in _ANOMALY_VALUES)})
            RETURNING (a.xmax = 0) AS new
        ),"""
    added = "(SELECT count(*) FROM anomalies WHERE new)" if anomalies else "0"
    statistics = f"""
        statistics AS (
            INSERT INTO {_STATISTICS} AS s
                (exchange_id, symbol, timeframe, first_ts, last_ts, candles, anomalies, last_collected_at)
            SELECT %s, %s, %s, %s::bigint, %s::bigint, {{candles}}, {{anomalies}}, %s::timestamptz {{source}}
            ON CONFLICT (exchange_id, symbol, timeframe) DO UPDATE SET
                first_ts = LEAST(s.first_ts, EXCLUDED.first_ts), last_ts = GREATEST(s.last_ts, EXCLUDED.last_ts),
                candles = s.candles + EXCLUDED.candles, anomalies = s.anomalies + EXCLUDED.anomalies,
                last_collected_at = EXCLUDED.last_collected_at
        )"""
    candle_columns = "exchange_id, symbol, timeframe, ts, open, high, low, close, volume"
    if fresh:
        # The emptiness check is a CTE that the INSERT and the statistics both read: one snapshot, so
        # they agree, and the batch is inserted whole or not at all.
        return f"""
            WITH fresh AS (
                SELECT NOT EXISTS (
                    SELECT FROM {_CANDLES}
                    WHERE exchange_id = %s AND symbol = %s AND timeframe = %s AND ts BETWEEN %s AND %s
                ) AS ok
            ),
            written AS (
                INSERT INTO {_CANDLES} ({candle_columns}) {_UNNEST_ROWS} WHERE (SELECT ok FROM fresh)
            ),
            {anomaly_insert if anomalies else ""}
            {statistics.format(candles="%s::bigint", anomalies=added, source="FROM fresh WHERE ok")}
            SELECT ok FROM fresh
        """
    upsert_statistics = statistics.format(
        candles="counts.inserted", anomalies=f"{added} - (SELECT count(*) FROM cleared)", source="FROM counts"
    )
    return f"""
        WITH written AS (
            INSERT INTO {_CANDLES} AS c ({candle_columns})
            {_UNNEST_ROWS}
            ON CONFLICT (exchange_id, symbol, timeframe, ts) DO UPDATE SET
                open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
                close = EXCLUDED.close, volume = EXCLUDED.volume
            WHERE {" OR ".join(f"c.{f} <> EXCLUDED.{f}" for f in VALUE_FIELDS)}
            RETURNING (c.xmax = 0) AS inserted
        ),
        counts AS (
            SELECT count(*) FILTER (WHERE inserted) AS inserted, count(*) FILTER (WHERE NOT inserted) AS updated
            FROM written
        ),
        cleared AS (
            DELETE FROM {_ANOMALIES} AS a
            WHERE a.exchange_id = %s AND a.symbol = %s AND a.timeframe = %s AND a.ts BETWEEN %s AND %s
                AND a.ts = ANY(%s::bigint[])
                AND (a.ts, a.kind) NOT IN (SELECT f.ts, f.kind FROM unnest(%s::bigint[], %s::text[]) AS f(ts, kind))
            RETURNING 1
        ),
        {anomaly_insert if anomalies else ""}
        {upsert_statistics}
        SELECT inserted, updated FROM counts
    """


def _sqlite_upsert(
    exchange_id: str, symbol: str, timeframe: str, rows: list[tuple], flagged: list[tuple]
) -> tuple[int, int, int]:
    """INSERT ... ON CONFLICT DO UPDATE ... WHERE values differ RETURNING ts, per batch.

    SQLite has no xmax, so the batch's keys that already exist are read first, in the same transaction
    (the settings open SQLite transactions IMMEDIATE, so no other writer can slip in between): a returned
    ts that existed was updated, one that did not was inserted. The anomalies (when the batch has some or
    revised a candle) and the statistics are written in the batch's transaction.
    """
    table = Candle._meta.db_table
    differs = " OR ".join(f"c.{f} <> excluded.{f}" for f in VALUE_FIELDS)
    with connection.cursor():
        limit = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    batch_size = max(1, min(SQL_BATCH, limit // 9))
    inserted = updated = unchanged = 0
    for batch in _batches(rows, batch_size):
        values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(batch))
        params: list[Any] = []
        for row in batch:
            params.extend((exchange_id, symbol, timeframe, *row))
        sql = f"""
            INSERT INTO {table} AS c (exchange_id, symbol, timeframe, ts, open, high, low, close, volume)
            VALUES {values}
            ON CONFLICT (exchange_id, symbol, timeframe, ts) DO UPDATE SET
                open = excluded.open, high = excluded.high, low = excluded.low,
                close = excluded.close, volume = excluded.volume
            WHERE {differs}
            RETURNING ts
        """
        keys = {row[0] for row in batch}
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"SELECT ts FROM {table} WHERE exchange_id = %s AND symbol = %s AND timeframe = %s "
                "AND ts >= %s AND ts <= %s",
                [exchange_id, symbol, timeframe, batch[0][0], batch[-1][0]],
            )
            existing = {ts for (ts,) in cursor.fetchall()} & keys
            cursor.execute(sql, params)
            written = {ts for (ts,) in cursor.fetchall()}
            revised = sorted(written & existing)
            batch_flagged = _flagged_in(flagged, batch)
            anomalies = (
                Anomaly.objects.record(exchange_id, symbol, timeframe, batch_flagged, revised)
                if batch_flagged or revised
                else 0
            )
            new = len(written) - len(revised)
            _record_statistics(exchange_id, symbol, timeframe, batch[0][0], batch[-1][0], new, anomalies)
        batch_updated = len(revised)
        inserted += len(written) - batch_updated
        updated += batch_updated
        unchanged += len(existing) - batch_updated
    return inserted, updated, unchanged


def orm_upsert(
    exchange_id: str, symbol: str, timeframe: str, rows: list[tuple], flagged: list[tuple] = ()
) -> tuple[int, int, int]:
    """Portable fallback (old SQLite, other databases): read the batch's keys, then insert and update.

    Not safe against a concurrent writer of the same keys on databases without serialised writes; the
    two supported databases never take this path.
    """
    inserted = updated = unchanged = 0
    series = _series(Candle, exchange_id, symbol, timeframe)
    for batch in _batches(rows, SQL_BATCH):
        with transaction.atomic():
            existing = {c.ts: c for c in series.filter(ts__in=[row[0] for row in batch])}
            new, changed = [], []
            for ts, *values in batch:
                candle = existing.get(ts)
                if candle is None:
                    new.append(Candle(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe, ts=ts))
                    candle = new[-1]
                elif [getattr(candle, f) for f in VALUE_FIELDS] != values:
                    changed.append(candle)
                else:
                    continue
                for field, value in zip(VALUE_FIELDS, values, strict=True):
                    setattr(candle, field, value)
            Candle.objects.bulk_create(new)
            Candle.objects.bulk_update(changed, VALUE_FIELDS)
            batch_flagged = _flagged_in(list(flagged), batch)
            revised = [candle.ts for candle in changed]
            anomalies = (
                Anomaly.objects.record(exchange_id, symbol, timeframe, batch_flagged, revised)
                if batch_flagged or revised
                else 0
            )
            _record_statistics(exchange_id, symbol, timeframe, batch[0][0], batch[-1][0], len(new), anomalies)
        inserted, updated = inserted + len(new), updated + len(changed)
        unchanged += len(batch) - len(new) - len(changed)
    return inserted, updated, unchanged


def delete_candles(exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None) -> int:
    """Delete the candles in the bounds with their anomalies, and correct the statistics, in one transaction."""
    with transaction.atomic():
        deleted, _ = _series(Candle, exchange_id, symbol, timeframe, start_ts, end_ts).delete()
        if deleted:
            anomalies, _ = Anomaly.objects.for_series(exchange_id, symbol, timeframe).within(start_ts, end_ts).delete()
            statistics = SeriesStatistics.objects.filter(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe)
            first = first_ts(exchange_id, symbol, timeframe)
            if first is None:
                statistics.delete()
            else:
                statistics.update(
                    first_ts=first,
                    last_ts=last_ts(exchange_id, symbol, timeframe),
                    candles=Greatest(F("candles") - deleted, Value(0)),
                    anomalies=Greatest(F("anomalies") - anomalies, Value(0)),
                )
    return deleted


# --- Statistics -------------------------------------------------------------------------------------

_STATISTICS_FIELDS = (
    "exchange_id",
    "symbol",
    "timeframe",
    "first_ts",
    "last_ts",
    "candles",
    "anomalies",
    "last_collected_at",
)


def series_statistics(filters: dict[str, str], offset: int, limit: int | None) -> list[tuple]:
    rows = SeriesStatistics.objects.filter(**filters).order_by("exchange_id", "symbol", "timeframe")
    rows = rows[offset : None if limit is None else offset + limit]
    return list(rows.values_list(*_STATISTICS_FIELDS))


def count_series_statistics(filters: dict[str, str]) -> int:
    return SeriesStatistics.objects.filter(**filters).count()


def rebuild_statistics(find_anomalies: Callable[[list[tuple]], list[tuple]]) -> int:
    """Statistics and anomalies recomputed from the candles: one grouped pass, then a pass over the rows
    that break an invariant (found by the database)."""
    odd = (
        models.Q(high__lt=F("open"))
        | models.Q(high__lt=F("close"))
        | models.Q(high__lt=F("low"))
        | models.Q(low__gt=F("open"))
        | models.Q(low__gt=F("close"))
    )
    suspects = Candle.objects.filter(odd).order_by("exchange_id", "symbol", "timeframe", "ts")
    by_series: dict[tuple[str, str, str], list[tuple]] = {}
    for exchange_id, symbol, timeframe, *row in suspects.values_list(
        "exchange_id", "symbol", "timeframe", "ts", *VALUE_FIELDS
    ).iterator():
        by_series.setdefault((exchange_id, symbol, timeframe), []).append(tuple(row))
    collected = dict(
        ((e, s, t), at)
        for e, s, t, at in SeriesStatistics.objects.values_list(
            "exchange_id", "symbol", "timeframe", "last_collected_at"
        )
    )
    with transaction.atomic():
        Anomaly.objects.all().delete()
        SeriesStatistics.objects.all().delete()
        anomalies = {}
        for key, rows in by_series.items():
            anomalies[key] = Anomaly.objects.record(*key, find_anomalies(rows), [])
        series = series_coverage()
        SeriesStatistics.objects.bulk_create(
            [
                SeriesStatistics(
                    exchange_id=e,
                    symbol=s,
                    timeframe=t,
                    first_ts=first,
                    last_ts=last,
                    candles=count,
                    anomalies=anomalies.get((e, s, t), 0),
                    last_collected_at=collected.get((e, s, t)),
                )
                for e, s, t, first, last, count in series
            ],
            batch_size=1000,
        )
    return len(series)


# --- Candles: reads ---------------------------------------------------------------------------------


def read_candles(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None, limit: int | None
) -> list[list]:
    queryset = _series(Candle, exchange_id, symbol, timeframe, start_ts, end_ts).order_by("ts")
    if limit is not None:
        queryset = queryset[:limit]
    return [list(row) for row in queryset.values_list("ts", *VALUE_FIELDS)]


def read_closes(exchange_id: str, symbol: str, timeframe: str, start_ts: int) -> tuple[np.ndarray, np.ndarray]:
    """(ts, close) arrays of the candles from `start_ts` on.

    PostgreSQL returns them as two binary arrays that numpy reads in place, rather than a Python tuple
    per candle: a recompute reads millions.
    """
    table = Candle._meta.db_table
    where = "WHERE exchange_id = %s AND symbol = %s AND timeframe = %s AND ts >= %s"
    params = [exchange_id, symbol, timeframe, start_ts]
    if connection.vendor == "postgresql":
        with _psycopg_cursor() as cursor:
            cursor.adapters.register_loader(_INT8_ARRAY_OID, _RawLoader)
            cursor.adapters.register_loader(_FLOAT8_ARRAY_OID, _RawLoader)
            cursor.execute(
                f"SELECT array_agg(ts ORDER BY ts), array_agg(close ORDER BY ts) FROM {table} {where}",
                params,
                binary=True,
            )
            ts, close = cursor.fetchone()
        return _parse_binary_array(ts, _INT8), _parse_binary_array(close, _FLOAT8)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT ts, close FROM {table} {where} ORDER BY ts", params)
        rows = cursor.fetchall()
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=float)
    ts, close = zip(*rows, strict=True)
    return np.array(ts, dtype=np.int64), np.array(close, dtype=float)


def iter_candle_columns(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None, chunk_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """The candles in the bounds as column arrays, `chunk_size` rows per chunk, ascending ts.

    Keyset paging on the unique index, each chunk a query of its own (no transaction or server-side cursor
    outlives a chunk). PostgreSQL answers a chunk with one bytea per column, the values' binary send format
    end to end (string_agg of int8send/float8send), which numpy reads in one go: no Python object per
    candle, which is what lets an export write a million candles a second. Measured per million candles
    (benchmarks/bench_export.py): 0.64 s of server CPU and 0.04 s here, against 0.75 s and 0.25 s for six
    binary arrays (array_agg, with a length word per element) and 0.45 s and 0.55 s for COPY BINARY
    (psycopg hands a COPY over one row at a time). PostgreSQL's work is then most of an export's.
    """
    table = Candle._meta.db_table
    fields = ("ts", *VALUE_FIELDS)
    postgres = connection.vendor == "postgresql"
    next_start = start_ts
    while True:
        where = ["exchange_id = %s", "symbol = %s", "timeframe = %s"]
        params: list[Any] = [exchange_id, symbol, timeframe]
        if next_start is not None:
            where.append("ts >= %s")
            params.append(next_start)
        if end_ts is not None:
            where.append("ts <= %s")
            params.append(end_ts)
        page = f"SELECT {', '.join(fields)} FROM {table} WHERE {' AND '.join(where)} ORDER BY ts LIMIT %s"
        params.append(chunk_size)
        if postgres:
            # string_agg keeps the subquery's order: PostgreSQL aggregates rows as the ordered scan yields
            # them. The columns are NOT NULL, so no value is skipped and every column has a row's worth.
            aggregated = ", ".join(
                f"string_agg({'int8send' if field == 'ts' else 'float8send'}({field}), ''::bytea)" for field in fields
            )
            with _psycopg_cursor() as cursor:
                cursor.execute(f"SELECT {aggregated} FROM ({page}) AS page", params, binary=True, prepare=False)
                columns = cursor.fetchone()
            chunk = {
                field: np.frombuffer(data or b"", dtype=">i8" if field == "ts" else ">f8").astype(
                    np.int64 if field == "ts" else np.float64
                )
                for field, data in zip(fields, columns, strict=True)
            }
        else:
            with connection.cursor() as cursor:
                cursor.execute(page, params)
                rows = cursor.fetchall()
            table_rows = np.array(rows, dtype=_CANDLE_COLUMNS) if rows else np.empty(0, dtype=_CANDLE_COLUMNS)
            chunk = {field: np.ascontiguousarray(table_rows[field]) for field in fields}
        if len(chunk["ts"]):
            yield chunk
        if len(chunk["ts"]) < chunk_size:
            return
        next_start = int(chunk["ts"][-1]) + 1


def first_ts(exchange_id: str, symbol: str, timeframe: str) -> int | None:
    return _series(Candle, exchange_id, symbol, timeframe).order_by("ts").values_list("ts", flat=True).first()


def last_ts(exchange_id: str, symbol: str, timeframe: str) -> int | None:
    return _series(Candle, exchange_id, symbol, timeframe).order_by("-ts").values_list("ts", flat=True).first()


def bounds(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> tuple[int, int] | None:
    # min() and max() alone let PostgreSQL answer each from one end of the index.
    stats = _series(Candle, exchange_id, symbol, timeframe, start_ts, end_ts).aggregate(first=Min("ts"), last=Max("ts"))
    return None if stats["first"] is None else (stats["first"], stats["last"])


def coverage(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> tuple[int | None, int | None, int]:
    stats = _series(Candle, exchange_id, symbol, timeframe, start_ts, end_ts).aggregate(
        first=Min("ts"), last=Max("ts"), count=Count("ts")
    )
    return stats["first"], stats["last"], stats["count"]


def series_coverage() -> list[tuple[str, str, str, int, int, int]]:
    rows = (
        Candle.objects.values_list("exchange_id", "symbol", "timeframe")
        .annotate(first_ts=Min("ts"), last_ts=Max("ts"), count=Count("ts"))
        .order_by("exchange_id", "symbol", "timeframe")
    )
    return list(rows)


def holes(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int, end_ts: int, step: int
) -> list[tuple[int, int]]:
    """Missing slots between stored candles, found with LAG() over the series' index."""
    # Two neighbours further apart than two steps leave at least one whole slot between them; a distance
    # between one and two steps is a candle off the grid, not a missing slot.
    sql = f"""
        SELECT prev_ts + %s, ts - %s FROM (
            SELECT ts, LAG(ts) OVER (ORDER BY ts) AS prev_ts FROM {Candle._meta.db_table}
            WHERE exchange_id = %s AND symbol = %s AND timeframe = %s AND ts >= %s AND ts <= %s
        ) AS neighbours
        WHERE ts - prev_ts >= %s
        ORDER BY ts
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [step, step, exchange_id, symbol, timeframe, start_ts, end_ts, 2 * step])
        return [(int(first), int(last)) for first, last in cursor.fetchall()]


# --- Indicator rows ---------------------------------------------------------------------------------


def write_indicators(
    exchange_id: str, symbol: str, timeframe: str, ts: np.ndarray, columns: dict[str, np.ndarray]
) -> None:
    """Store packed rows; identical stored rows are left alone, new ones INSERTed, changed ones upserted.

    The stored rows of each batch's range are read and compared as bytes first: an append of candles
    writes only new rows, which PostgreSQL then inserts without ON CONFLICT's speculative insertion
    (half the cost), and a repeated update writes nothing.
    """
    packed = PackedRows.pack(ts, columns)
    write = _postgres_indicator_write if connection.vendor == "postgresql" else _orm_indicator_write
    for start in range(0, len(packed.ts), POSTGRES_BATCH):
        batch = packed.take(slice(start, start + POSTGRES_BATCH))
        stored = _stored_indicator_rows(exchange_id, symbol, timeframe, int(batch.ts[0]), int(batch.ts[-1]))
        new, changed = batch.compare(stored)
        write(exchange_id, symbol, timeframe, batch.take(new), batch.take(changed))


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of one series as the SQL table stores them: one column list for all, one packed block per ts."""

    ts: np.ndarray
    columns: str
    matrix: np.ndarray  # (rows, columns) of big-endian float64, C-contiguous

    @classmethod
    def pack(cls, ts: np.ndarray, columns: dict[str, np.ndarray]) -> "PackedRows":
        matrix = np.empty((len(ts), len(columns)), dtype=">f8")
        for j, values in enumerate(columns.values()):
            matrix[:, j] = values
        # One NaN bit pattern (0/0 inside ta gives the negative one), so equal rows are equal bytes.
        matrix[np.isnan(matrix)] = np.nan
        return cls(np.asarray(ts, dtype=np.int64), ",".join(columns), matrix)

    def take(self, index: slice | np.ndarray) -> "PackedRows":
        return PackedRows(self.ts[index], self.columns, np.ascontiguousarray(self.matrix[index]))

    def data(self) -> list[bytes]:
        """Each row's packed values."""
        width = self.matrix.shape[1] * 8
        blob = self.matrix.tobytes()
        return [blob[i : i + width] for i in range(0, len(blob), width)] if width else [b""] * len(self.ts)

    def compare(self, stored: list[tuple[int, str, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """Indices of rows not stored yet and of rows stored with other columns or values."""
        is_stored = np.zeros(len(self.ts), dtype=bool)
        differs = np.zeros(len(self.ts), dtype=bool)
        if stored:
            stored_ts = np.fromiter((row[0] for row in stored), dtype=np.int64, count=len(stored))
            position = np.searchsorted(self.ts, stored_ts).clip(max=len(self.ts) - 1)
            ours = self.ts[position] == stored_ts  # the table may hold ts this batch has not (orphans)
            position, rows = position[ours], [row for row, keep in zip(stored, ours.tolist(), strict=True) if keep]
            is_stored[position] = True
            width = self.matrix.shape[1] * 8
            same_layout = np.array([row[1] == self.columns and len(row[2]) == width for row in rows], dtype=bool)
            differs[position[~same_layout]] = True
            comparable = position[same_layout]
            if len(comparable) and width:
                blob = b"".join(bytes(row[2]) for row, same in zip(rows, same_layout.tolist(), strict=True) if same)
                old = np.frombuffer(blob, dtype=">u8").reshape(len(comparable), -1)
                differs[comparable] = (old != self.matrix[comparable].view(">u8")).any(axis=1)
        return np.flatnonzero(~is_stored), np.flatnonzero(differs)


def _stored_indicator_rows(
    exchange_id: str, symbol: str, timeframe: str, first: int, last: int
) -> list[tuple[int, str, bytes]]:
    """(ts, columns, data) of the table's rows of a series within [first, last]."""
    if connection.vendor == "postgresql":
        with _psycopg_cursor() as cursor:
            cursor.execute(
                f"SELECT ts, columns, data FROM {IndicatorRow._meta.db_table} "
                "WHERE exchange_id = %s AND symbol = %s AND timeframe = %s AND ts BETWEEN %s AND %s",
                [exchange_id, symbol, timeframe, first, last],
                binary=True,
            )
            return cursor.fetchall()
    return list(
        _series(IndicatorRow, exchange_id, symbol, timeframe, first, last)
        .values_list("ts", "columns", "data")
        .order_by()
    )


def _postgres_indicator_write(
    exchange_id: str, symbol: str, timeframe: str, new: PackedRows, changed: PackedRows
) -> None:
    """INSERT the new rows, upsert the changed ones; each statement takes ts and data as two binary arrays.

    Should another writer (a recompute beside the scheduler) insert one of the new rows between the read
    of the stored rows and this INSERT, the unique key refuses it and the upsert settles the batch.
    """
    with _psycopg_cursor() as cursor:
        if len(new.ts):
            try:
                # Inside a caller's transaction the failed INSERT must be rolled back to a savepoint; in
                # autocommit it is a transaction of its own (BEGIN and COMMIT would cost a round trip each).
                with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
                    _postgres_indicator_insert(cursor, exchange_id, symbol, timeframe, new, upsert=False)
            except psycopg.errors.UniqueViolation:
                _postgres_indicator_insert(cursor, exchange_id, symbol, timeframe, new, upsert=True)
        if len(changed.ts):
            _postgres_indicator_insert(cursor, exchange_id, symbol, timeframe, changed, upsert=True)


def _postgres_indicator_insert(
    cursor: psycopg.Cursor, exchange_id: str, symbol: str, timeframe: str, rows: PackedRows, upsert: bool
) -> None:
    sql = f"""
        INSERT INTO {IndicatorRow._meta.db_table} AS i (exchange_id, symbol, timeframe, ts, columns, data)
        SELECT %s, %s, %s, r.ts, %s, r.data FROM unnest(%s::bigint[], %s::bytea[]) AS r(ts, data)
    """
    if upsert:
        sql += """
            ON CONFLICT (exchange_id, symbol, timeframe, ts) DO UPDATE
            SET columns = EXCLUDED.columns, data = EXCLUDED.data
            WHERE (i.columns, i.data) IS DISTINCT FROM (EXCLUDED.columns, EXCLUDED.data)
        """
    cursor.execute(
        sql,
        [exchange_id, symbol, timeframe, rows.columns, BinaryArray.int8(rows.ts), BinaryArray.bytea(rows.matrix)],
    )


def _orm_indicator_write(exchange_id: str, symbol: str, timeframe: str, new: PackedRows, changed: PackedRows) -> None:
    """The portable path (SQLite): one upsert of the new and changed rows, in batches."""
    rows = [
        IndicatorRow(
            exchange_id=exchange_id, symbol=symbol, timeframe=timeframe, ts=ts, columns=part.columns, data=data
        )
        for part in (new, changed)
        for ts, data in zip(part.ts.tolist(), part.data(), strict=True)
    ]
    IndicatorRow.objects.bulk_create(
        rows,
        batch_size=INDICATOR_SQL_BATCH,
        update_conflicts=True,
        unique_fields=["exchange_id", "symbol", "timeframe", "ts"],
        update_fields=["columns", "data"],
    )


def read_indicators(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None, limit: int | None
) -> list[tuple[int, dict[str, float | None]]]:
    queryset = _series(IndicatorRow, exchange_id, symbol, timeframe, start_ts, end_ts).order_by("ts")
    if limit is not None:
        queryset = queryset[:limit]
    return [(ts, unpack_values(columns, data)) for ts, columns, data in queryset.values_list("ts", "columns", "data")]


def indicator_ts(exchange_id: str, symbol: str, timeframe: str) -> np.ndarray:
    ts = list(_series(IndicatorRow, exchange_id, symbol, timeframe).values_list("ts", flat=True))
    return np.array(ts, dtype=np.int64)


def delete_indicators(exchange_id: str, symbol: str, timeframe: str, ts: list[int]) -> None:
    _series(IndicatorRow, exchange_id, symbol, timeframe).filter(ts__in=ts).delete()


def delete_indicator_range(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> int:
    deleted, _ = _series(IndicatorRow, exchange_id, symbol, timeframe, start_ts, end_ts).delete()
    return deleted


# --- PostgreSQL binary arrays -----------------------------------------------------------------------

# Element type oid and big-endian dtype of the arrays exchanged with PostgreSQL.
_INT8 = (20, ">i8")
_FLOAT8 = (701, ">f8")
_BYTEA_OID = 17
_INT8_ARRAY_OID = 1016
_FLOAT8_ARRAY_OID = 1022


class BinaryArray:
    """A 1-d array sent as a PostgreSQL array in binary wire format (what array_send produces)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @staticmethod
    def _header(oid: int, length: int) -> bytes:
        # ndim 1, no NULL elements, element oid, one dimension of `length` with lower bound 1; then
        # (length, bytes) per element.
        return struct.pack(">iiiii", 1, 0, oid, length, 1)

    @classmethod
    def _fixed(cls, values: np.ndarray, element: tuple[int, str]) -> "BinaryArray":
        oid, dtype = element
        items = np.empty(len(values), dtype=[("length", ">i4"), ("value", dtype)])
        items["length"] = 8
        items["value"] = values
        return cls(cls._header(oid, len(values)) + items.tobytes())

    @classmethod
    def int8(cls, values: np.ndarray) -> "BinaryArray":
        return cls._fixed(values, _INT8)

    @classmethod
    def float8(cls, values: np.ndarray) -> "BinaryArray":
        return cls._fixed(values, _FLOAT8)

    @classmethod
    def bytea(cls, matrix: np.ndarray) -> "BinaryArray":
        """One bytea element per row of a big-endian float64 matrix: the row's packed values."""
        rows, width = matrix.shape[0], matrix.shape[1] * 8
        items = np.empty((rows, 4 + width), dtype=np.uint8)
        items[:, :4] = np.frombuffer(struct.pack(">i", width), dtype=np.uint8)
        items[:, 4:] = matrix.view(np.uint8).reshape(rows, width)
        return cls(cls._header(_BYTEA_OID, rows) + items.tobytes())


class _BinaryArrayDumper(psycopg.adapt.Dumper):
    format = psycopg.pq.Format.BINARY

    def dump(self, obj: BinaryArray) -> bytes:
        return obj.data


class _RawLoader(psycopg.adapt.Loader):
    """Hands over a binary value's bytes untouched (for numpy to read arrays in one go)."""

    format = psycopg.pq.Format.BINARY

    def load(self, data: bytes | bytearray | memoryview) -> bytes:
        return bytes(data)


def _parse_binary_array(data: bytes | None, element: tuple[int, str]) -> np.ndarray:
    """A one-dimensional PostgreSQL array without NULLs, in binary format, as a native numpy array."""
    dtype = np.dtype(element[1]).newbyteorder("=")
    if data is None or struct.unpack_from(">i", data)[0] == 0:
        return np.empty(0, dtype=dtype)
    length = struct.unpack_from(">i", data, 12)[0]
    items = np.frombuffer(data, dtype=[("length", ">i4"), ("value", element[1])], count=length, offset=20)
    return items["value"].astype(dtype)
