"""The candle store: one API over two backends.

With `settings.MONGODB_URI` set, candles live in MongoDB (collection `candles`, a regular collection with a
unique index on `(exchange_id, symbol, timeframe, ts)`); without it, in the `Candle` table of the Django
database (the embedded store: SQLite by default, PostgreSQL in production and tests). Callers never know
which: every function here checks the setting on each call and dispatches.

A candle is a ccxt row `[ts, open, high, low, close, volume]`; `ts` is the open time in UTC milliseconds.

What is stored is what the exchange sent. Rows are rejected only when they cannot be a candle at all:
a missing or non-integer `ts`, a value that is not a finite number (NaN, infinity, None, a string), or a
negative volume. Odd but real candles (high below low, open or close outside the high-low range, zero
volume, a `ts` off the timeframe grid) are stored unchanged: exchanges do publish such candles, and a
collector that "repairs" them silently would no longer be a faithful record. Checks of that kind belong to
whoever analyses the data.

Writes go in batches; each batch commits on its own, so a crash mid-call leaves whole batches behind and
re-running the same call is idempotent (upserts keyed on the natural key).
"""

import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from numbers import Real
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import psycopg
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, models, transaction
from django.db.models import Count, Max, Min
from pymongo import MongoClient, UpdateOne
from pymongo.errors import BulkWriteError, OperationFailure

from apps.marketdata.models import Candle
from apps.marketdata.timeframes import (
    align_down,
    align_up,
    check_timeframe,
    grid_origin,
    is_calendar_timeframe,
    month_index,
    month_start,
    months_per_slot,
    timeframe_ms,
)

logger = logging.getLogger(__name__)

CANDLES = "candles"
INDICATORS = "indicators"
SERIES_KEY = ("exchange_id", "symbol", "timeframe", "ts")
VALUE_FIELDS = ("open", "high", "low", "close", "volume")

# Rows per round trip. Mongo caps one bulk message at 100,000 operations and 48 MB; 1,000 small upserts
# keep each message well under that and keep a failed batch cheap to retry. PostgreSQL takes a batch as
# six arrays (one parameter each), so bigger batches only cost memory.
MONGO_BATCH = 1_000
POSTGRES_BATCH = 5_000
SQL_BATCH = 1_000
# Rows fetched per query by iter_candles: big enough to amortise the round trip, small enough that a
# stream of millions of rows holds only one chunk in memory.
ITER_CHUNK = 10_000


class UpsertResult(NamedTuple):
    inserted: int
    updated: int
    unchanged: int

    @property
    def written(self) -> int:
        """Candles that changed the store (new or revised): what a run reports as written."""
        return self.inserted + self.updated

    def __add__(self, other: object) -> "UpsertResult":  # type: ignore[override]
        if not isinstance(other, UpsertResult):
            return NotImplemented
        return UpsertResult(*(a + b for a, b in zip(self, other, strict=True)))


class Coverage(NamedTuple):
    first_ts: int | None
    last_ts: int | None
    count: int


class SeriesCoverage(NamedTuple):
    exchange_id: str
    symbol: str
    timeframe: str
    first_ts: int
    last_ts: int
    count: int


class InvalidCandleError(ValueError):
    """A row that cannot be stored as a candle; the message names the row, its ts and the field."""


# --- Input validation -------------------------------------------------------------------------------


def _check_series(exchange_id: str, symbol: str, timeframe: str) -> None:
    if not exchange_id or not isinstance(exchange_id, str):
        raise ValueError(f"exchange_id must be a non-empty string, got {exchange_id!r}")
    if not symbol or not isinstance(symbol, str):
        raise ValueError(f"symbol must be a non-empty string, got {symbol!r}")
    check_timeframe(timeframe)


def _number(value: Any) -> float | None:
    """The value as a float when it is a finite real number (bools are not numbers here), else None."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def normalize_candles(candles: Iterable[Sequence[Any]]) -> list[tuple[int, float, float, float, float, float]]:
    """Validate ccxt rows and return them as typed tuples, sorted by ts, one per ts (the last one wins).

    The whole input is checked before anything is written, so a bad row rejects the call, not half of it.
    Sorting also makes concurrent writers touch keys in the same order, which keeps PostgreSQL's row
    locks from deadlocking; deduplicating is required because one INSERT ... ON CONFLICT statement may
    not update the same row twice.
    """
    by_ts: dict[int, tuple[int, float, float, float, float, float]] = {}
    isfinite = math.isfinite
    for index, row in enumerate(candles):
        # Fast path for what ccxt returns (an int and five floats): this loop runs for every candle
        # ingested. A NaN or infinity anywhere makes the sum non-finite; so can an overflow of huge but
        # finite values, which the full checks below then accept.
        if type(row) is list and len(row) >= 6:
            ts, o, h, lo, c, v = row[0], row[1], row[2], row[3], row[4], row[5]
            if (
                type(ts) is int
                and ts >= 0
                and type(o) is float
                and type(h) is float
                and type(lo) is float
                and type(c) is float
                and type(v) is float
                and v >= 0
                and isfinite(o + h + lo + c + v)
            ):
                by_ts[ts] = (ts, o, h, lo, c, v)
                continue
        if isinstance(row, str | bytes) or not isinstance(row, Sequence) or len(row) < 6:
            raise InvalidCandleError(f"candle #{index} is not a row [ts, open, high, low, close, volume]: {row!r}")
        ts = row[0]
        if isinstance(ts, float) and ts.is_integer():
            ts = int(ts)
        if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
            raise InvalidCandleError(f"candle #{index}: ts must be a non-negative integer (UTC ms), got {ts!r}")
        values = []
        for name, raw in zip(VALUE_FIELDS, row[1:6], strict=True):
            number = _number(raw)
            if number is None:
                raise InvalidCandleError(f"candle #{index} (ts={ts}): {name} must be a finite number, got {raw!r}")
            values.append(number)
        if values[4] < 0:
            raise InvalidCandleError(f"candle #{index} (ts={ts}): volume must not be negative, got {values[4]!r}")
        by_ts[ts] = (ts, *values)  # type: ignore[assignment]
    return [by_ts[ts] for ts in sorted(by_ts)]


def _batches(rows: list, size: int) -> Iterator[list]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


# --- Backend choice and the Mongo client ------------------------------------------------------------

_client_lock = threading.Lock()
_client: Any = None  # pymongo.MongoClient, or a mongomock_ng client injected by tests
_client_pid: int | None = None
_client_injected = False
_indexes_ensured = False


def uses_mongo() -> bool:
    """True when candles (and indicators) go to MongoDB rather than the Django database."""
    return bool(settings.MONGODB_URI) or _client_injected


def get_mongo_client() -> Any:
    """The process's MongoClient, created on first use; indexes are ensured once per process on creation.

    A MongoClient must not cross a fork (its sockets and monitor threads belong to the parent), so a
    child process that inherits one makes its own.
    """
    global _client, _client_pid, _indexes_ensured
    with _client_lock:
        if _client is not None and (_client_injected or _client_pid == os.getpid()):
            return _client
        if not settings.MONGODB_URI:
            raise ImproperlyConfigured("MONGODB_URI is not set: the candle store is the embedded (SQL) one.")
        _client = MongoClient(settings.MONGODB_URI, tz_aware=True, **_client_defaults(settings.MONGODB_URI))
        _client_pid = os.getpid()
        _indexes_ensured = False
    return _client


# Fail fast when the server is unreachable instead of pymongo's 30 s default, so a job run fails with a
# clear error and is retried with backoff; allow long reads for a gap aggregation over a huge series.
_CLIENT_DEFAULTS = {
    "appname": "datacollector",
    "serverSelectionTimeoutMS": 5_000,
    "connectTimeoutMS": 5_000,
    "socketTimeoutMS": 300_000,
}


def _client_defaults(uri: str) -> dict[str, Any]:
    """Our defaults for the options the URI does not set (pymongo lets keyword arguments win)."""
    given = {key.lower() for key in parse_qs(urlsplit(uri).query)}
    return {key: value for key, value in _CLIENT_DEFAULTS.items() if key.lower() not in given}


def get_mongo_db() -> Any:
    """The pymongo Database holding `candles` and `indicators`, with their indexes ensured."""
    db = get_mongo_client()[settings.MONGODB_DATABASE]
    if not _indexes_ensured:
        ensure_indexes(db)
    return db


def set_mongo_client(client: Any) -> None:
    """Use this client (e.g. `mongomock_ng.MongoClient()`) instead of one built from MONGODB_URI.

    While a client is injected the store uses MongoDB whatever MONGODB_URI says. Tests call this and
    `reset_mongo_client()` afterwards.
    """
    global _client, _client_pid, _client_injected, _indexes_ensured
    with _client_lock:
        _client, _client_pid, _client_injected, _indexes_ensured = client, os.getpid(), True, False


def reset_mongo_client() -> None:
    """Forget the current client (closing it unless it was injected); the next use builds a new one."""
    global _client, _client_pid, _client_injected, _indexes_ensured
    with _client_lock:
        if _client is not None and not _client_injected:
            _client.close()
        _client, _client_pid, _client_injected, _indexes_ensured = None, None, False, False


def ensure_indexes(db: Any = None) -> None:
    """Create the unique series keys of `candles` and `indicators` if missing. Idempotent and cheap."""
    global _indexes_ensured
    db = db if db is not None else get_mongo_client()[settings.MONGODB_DATABASE]
    key = [(field, 1) for field in SERIES_KEY]
    for name in (CANDLES, INDICATORS):
        # The compound index serves every query here too: equality on the series, range and sort on ts.
        db[name].create_index(key, unique=True, name="series_ts_unique")
    _indexes_ensured = True


def _series_filter(exchange_id: str, symbol: str, timeframe: str) -> dict[str, Any]:
    return {"exchange_id": exchange_id, "symbol": symbol, "timeframe": timeframe}


def _ts_range(start_ts: int | None, end_ts: int | None) -> dict[str, int]:
    bounds = {}
    if start_ts is not None:
        bounds["$gte"] = start_ts
    if end_ts is not None:
        bounds["$lte"] = end_ts
    return bounds


def mongo_filter(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> dict[str, Any]:
    """The MongoDB filter of one series, `ts` bounds inclusive (candles and indicators alike)."""
    query: dict[str, Any] = _series_filter(exchange_id, symbol, timeframe)
    bounds = _ts_range(start_ts, end_ts)
    if bounds:
        query["ts"] = bounds
    return query


# --- Writes -----------------------------------------------------------------------------------------


def upsert_candles(exchange_id: str, symbol: str, timeframe: str, candles: Iterable[Sequence[Any]]) -> UpsertResult:
    """Store ccxt rows: new ones are inserted, revised ones updated, identical ones left alone.

    Counts are of distinct ts values (a ts repeated in the input is stored once, the last row winning).
    Raises InvalidCandleError, before writing anything, when a row is not a storable candle.
    """
    _check_series(exchange_id, symbol, timeframe)
    rows = normalize_candles(candles)
    if not rows:
        return UpsertResult(0, 0, 0)
    if uses_mongo():
        return _mongo_upsert(exchange_id, symbol, timeframe, rows)
    if connection.vendor == "postgresql":
        return _postgres_upsert(exchange_id, symbol, timeframe, rows)
    if connection.vendor == "sqlite" and _sqlite_has_returning():
        return _sqlite_upsert(exchange_id, symbol, timeframe, rows)
    return _orm_upsert(exchange_id, symbol, timeframe, rows)


def _mongo_upsert(exchange_id: str, symbol: str, timeframe: str, rows: list[tuple]) -> UpsertResult:
    """Unordered bulk upserts of `$set` on the values.

    MongoDB itself tells the three outcomes apart: an upsert that matched nothing inserts
    (`upserted_count`); one that matched counts in `matched_count`, and only a `$set` that actually
    changes a value counts in `modified_count` (the server compares old and new values and skips the
    write, and the oplog entry, for an identical document). So unchanged = matched - modified, with no
    read before the write and one round trip per batch. A filter of the form "key and any value differs"
    would not work: with upsert=True a non-matching filter means "insert", which would then collide with
    the unique index.
    """
    collection = get_mongo_db()[CANDLES]
    result = UpsertResult(0, 0, 0)
    for batch in _batches(rows, MONGO_BATCH):
        operations = [
            UpdateOne(
                {"exchange_id": exchange_id, "symbol": symbol, "timeframe": timeframe, "ts": ts},
                {"$set": {"open": o, "high": h, "low": lo, "close": c, "volume": v}},
                upsert=True,
            )
            for ts, o, h, lo, c, v in batch
        ]
        try:
            outcome = collection.bulk_write(operations, ordered=False)
            counts = (outcome.upserted_count, outcome.modified_count, outcome.matched_count)
        except BulkWriteError as error:
            # Two workers upserting the same new key at once: one may lose the race with a duplicate key
            # error (servers before 4.2 do not retry that themselves). The loser's candle is the same
            # key, now present, so running the batch again turns its inserts into matches.
            if any(e.get("code") != 11000 for e in error.details.get("writeErrors", [])):
                raise
            logger.info("Retrying a candle batch after a concurrent insert of the same keys")
            outcome = collection.bulk_write(operations, ordered=False)
            counts = (outcome.upserted_count, outcome.modified_count, outcome.matched_count)
        inserted, updated, matched = counts
        result += UpsertResult(inserted, updated, matched - updated)
    return result


def _postgres_upsert(exchange_id: str, symbol: str, timeframe: str, rows: list[tuple]) -> UpsertResult:
    """One INSERT ... ON CONFLICT DO UPDATE per batch, rows passed as six arrays through unnest().

    The WHERE on DO UPDATE skips rows whose values are all equal, so an identical candle writes no new
    row version (no dead tuple, no index entries; PostgreSQL only locks the row) and is not returned.
    A returned row is new when its xmax is 0, while an updated row carries the locking transaction's
    id there: an implementation detail, but a long-standing and widely relied-on one, and the contract
    tests check the counts. unchanged = batch size - returned rows.
    """
    table = Candle._meta.db_table
    differs = " OR ".join(f"c.{f} <> EXCLUDED.{f}" for f in VALUE_FIELDS)
    sql = f"""
        WITH written AS (
            INSERT INTO {table} AS c (exchange_id, symbol, timeframe, ts, open, high, low, close, volume)
            SELECT %s, %s, %s, r.* FROM unnest(
                %b::bigint[], %b::float8[], %b::float8[], %b::float8[], %b::float8[], %b::float8[]
            ) AS r
            ON CONFLICT (exchange_id, symbol, timeframe, ts) DO UPDATE SET
                open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
                close = EXCLUDED.close, volume = EXCLUDED.volume
            WHERE {differs}
            RETURNING (c.xmax = 0) AS inserted
        )
        SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written
    """
    result = UpsertResult(0, 0, 0)
    connection.ensure_connection()
    # Django's cursors bind parameters client-side: psycopg would quote 6 x 5,000 numbers into the SQL
    # text in Python, which was most of the CPU of an ingest. A plain psycopg cursor sends the arrays as
    # bound binary parameters (%b) instead. Same connection, so same transaction as the caller.
    with psycopg.Cursor(connection.connection) as cursor:
        for batch in _batches(rows, POSTGRES_BATCH):
            columns = [list(column) for column in zip(*batch, strict=True)]
            # No server-side prepared statement: they break behind a transaction-pooling pgbouncer.
            cursor.execute(sql, [exchange_id, symbol, timeframe, *columns], prepare=False)
            inserted, updated = cursor.fetchone()
            result += UpsertResult(inserted, updated, len(batch) - inserted - updated)
    return result


def _sqlite_has_returning() -> bool:
    import sqlite3

    return sqlite3.sqlite_version_info >= (3, 35, 0)


def _sqlite_upsert(exchange_id: str, symbol: str, timeframe: str, rows: list[tuple]) -> UpsertResult:
    """INSERT ... ON CONFLICT DO UPDATE ... WHERE values differ RETURNING ts, per batch.

    SQLite has no xmax, so the batch's keys that already exist are read first, in the same transaction
    (the settings open SQLite transactions IMMEDIATE, so no other writer can slip in between): a returned
    ts that existed was updated, one that did not was inserted.
    """
    import sqlite3

    table = Candle._meta.db_table
    differs = " OR ".join(f"c.{f} <> excluded.{f}" for f in VALUE_FIELDS)
    with connection.cursor() as cursor:
        limit = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    batch_size = max(1, min(SQL_BATCH, limit // 9))
    result = UpsertResult(0, 0, 0)
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
        updated = len(written & existing)
        result += UpsertResult(len(written) - updated, updated, len(existing) - updated)
    return result


def _orm_upsert(exchange_id: str, symbol: str, timeframe: str, rows: list[tuple]) -> UpsertResult:
    """Portable fallback (old SQLite, other databases): read the batch's keys, then insert and update.

    Not safe against a concurrent writer of the same keys on databases without serialised writes; the
    two supported databases never take this path.
    """
    result = UpsertResult(0, 0, 0)
    series = Candle.objects.filter(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe)
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
        result += UpsertResult(len(new), len(changed), len(batch) - len(new) - len(changed))
    return result


def delete_series(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> int:
    """Delete a series' candles (within the inclusive bounds, if given); returns how many were deleted."""
    if uses_mongo():
        return (
            get_mongo_db()[CANDLES]
            .delete_many(mongo_filter(exchange_id, symbol, timeframe, start_ts, end_ts))
            .deleted_count
        )
    deleted, _ = sql_series(Candle, exchange_id, symbol, timeframe, start_ts, end_ts).delete()
    return deleted


# --- Reads ------------------------------------------------------------------------------------------


def sql_series(
    model: type[models.Model],
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
) -> models.QuerySet:
    """The rows of one series in `model`'s table (Candle, IndicatorRow), `ts` bounds inclusive."""
    queryset = model.objects.filter(exchange_id=exchange_id, symbol=symbol, timeframe=timeframe)
    if start_ts is not None:
        queryset = queryset.filter(ts__gte=start_ts)
    if end_ts is not None:
        queryset = queryset.filter(ts__lte=end_ts)
    return queryset


def iter_chunks(
    read: Callable[[int | None, int], list], start_ts: int | None, limit: int | None, chunk_size: int
) -> Iterator:
    """Yield the rows `read(start_ts, size)` returns, chunk after chunk, each continuing after the last
    ts seen (row[0]): keyset paging on the unique index, so memory stays flat however long the range,
    and no server-side cursor or transaction is held open while a slow consumer takes its time."""
    remaining = limit
    next_start = start_ts
    while remaining is None or remaining > 0:
        size = chunk_size if remaining is None else min(chunk_size, remaining)
        chunk = read(next_start, size)
        yield from chunk
        if len(chunk) < size:
            return
        if remaining is not None:
            remaining -= len(chunk)
        next_start = chunk[-1][0] + 1


def read_candles(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    limit: int | None = None,
) -> list[list]:
    """Rows [ts, open, high, low, close, volume] in ascending ts, bounds inclusive, at most `limit` rows.

    For ranges that may be large, use iter_candles, which holds one chunk in memory at a time.
    """
    if limit is not None and limit <= 0:
        return []
    if uses_mongo():
        cursor = (
            get_mongo_db()[CANDLES]
            .find(
                mongo_filter(exchange_id, symbol, timeframe, start_ts, end_ts),
                {"_id": 0, "ts": 1, **dict.fromkeys(VALUE_FIELDS, 1)},
            )
            .sort("ts", 1)
        )
        if limit is not None:
            cursor = cursor.limit(limit)
        return [[doc["ts"], doc["open"], doc["high"], doc["low"], doc["close"], doc["volume"]] for doc in cursor]
    queryset = sql_series(Candle, exchange_id, symbol, timeframe, start_ts, end_ts).order_by("ts")
    if limit is not None:
        queryset = queryset[:limit]
    return [list(row) for row in queryset.values_list("ts", *VALUE_FIELDS)]


def iter_candles(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    limit: int | None = None,
    chunk_size: int = ITER_CHUNK,
) -> Iterator[list]:
    """Like read_candles, but yields rows one by one, fetching `chunk_size` at a time (see iter_chunks)."""
    return iter_chunks(
        lambda start, size: read_candles(exchange_id, symbol, timeframe, start, end_ts, size),
        start_ts,
        limit,
        chunk_size,
    )


def last_ts(exchange_id: str, symbol: str, timeframe: str) -> int | None:
    """Open time of the newest stored candle of the series, or None when it has none."""
    if uses_mongo():
        doc = get_mongo_db()[CANDLES].find_one(
            _series_filter(exchange_id, symbol, timeframe), {"_id": 0, "ts": 1}, sort=[("ts", -1)]
        )
        return None if doc is None else doc["ts"]
    return sql_series(Candle, exchange_id, symbol, timeframe).order_by("-ts").values_list("ts", flat=True).first()


def first_ts(exchange_id: str, symbol: str, timeframe: str) -> int | None:
    """Open time of the oldest stored candle of the series, or None when it has none."""
    if uses_mongo():
        doc = get_mongo_db()[CANDLES].find_one(
            _series_filter(exchange_id, symbol, timeframe), {"_id": 0, "ts": 1}, sort=[("ts", 1)]
        )
        return None if doc is None else doc["ts"]
    return sql_series(Candle, exchange_id, symbol, timeframe).order_by("ts").values_list("ts", flat=True).first()


def coverage(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> Coverage:
    """First and last stored ts and the number of candles, of the series (within the bounds, if given).

    The count walks the series' part of the unique index: fine for one series, not for a dashboard
    refreshing every series every second.
    """
    if uses_mongo():
        bounds = _stored_bounds(exchange_id, symbol, timeframe, start_ts, end_ts)
        if bounds is None:
            return Coverage(None, None, 0)
        query = mongo_filter(exchange_id, symbol, timeframe, start_ts, end_ts)
        return Coverage(*bounds, get_mongo_db()[CANDLES].count_documents(query))
    stats = sql_series(Candle, exchange_id, symbol, timeframe, start_ts, end_ts).aggregate(
        first=Min("ts"), last=Max("ts"), count=Count("ts")
    )
    return Coverage(stats["first"], stats["last"], stats["count"])


def list_series() -> list[tuple[str, str, str]]:
    """Every stored series as (exchange_id, symbol, timeframe), sorted."""
    return [(s.exchange_id, s.symbol, s.timeframe) for s in list_series_coverage()]


def list_series_coverage() -> list[SeriesCoverage]:
    """Every stored series with its first and last ts and count, sorted by series.

    One pass over the whole candle index (there is no cheaper way to find the distinct series in either
    backend): meant for the admin and reports, not for a per-request path.
    """
    if uses_mongo():
        pipeline = [
            {
                "$group": {
                    "_id": {"exchange_id": "$exchange_id", "symbol": "$symbol", "timeframe": "$timeframe"},
                    "first_ts": {"$min": "$ts"},
                    "last_ts": {"$max": "$ts"},
                    "count": {"$sum": 1},
                }
            },
            {"$sort": {"_id.exchange_id": 1, "_id.symbol": 1, "_id.timeframe": 1}},
        ]
        return [
            SeriesCoverage(
                doc["_id"]["exchange_id"],
                doc["_id"]["symbol"],
                doc["_id"]["timeframe"],
                doc["first_ts"],
                doc["last_ts"],
                doc["count"],
            )
            for doc in get_mongo_db()[CANDLES].aggregate(pipeline, allowDiskUse=True)
        ]
    rows = (
        Candle.objects.values_list("exchange_id", "symbol", "timeframe")
        .annotate(first_ts=Min("ts"), last_ts=Max("ts"), count=Count("ts"))
        .order_by("exchange_id", "symbol", "timeframe")
    )
    return [SeriesCoverage(*row) for row in rows]


# --- Gaps -------------------------------------------------------------------------------------------


def find_gaps(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> list[tuple[int, int]]:
    """Missing candle slots as inclusive (first_missing_ts, last_missing_ts) ranges, ascending.

    Slots run every timeframe from `start_ts` (default: the first stored candle) to `end_ts` (default:
    the last stored one), on the grid of the series' stored candles, so a bound between two slots is
    rounded inwards. A series with no candles at all uses the UTC epoch grid (Mondays for weeks), and
    without bounds it has no gaps.

    The holes between stored candles are found in the database (SQL: LAG() over the series' index; Mongo:
    $setWindowFields with $shift), and only the holes come back to Python.

    Months and years ("1M", "1y") are calendar slots: the 1st of each month (or January 1st) 00:00 UTC,
    the convention of ccxt and the exchanges. Those series are short (twelve candles a year), so they
    are compared with the calendar in Python. A candle off its grid (an exchange whose daily candles
    open at 08:00 UTC) does not break detection: the grid is taken from the stored candles.
    """
    _check_series(exchange_id, symbol, timeframe)
    if start_ts is not None and end_ts is not None and start_ts > end_ts:
        raise ValueError(f"start_ts {start_ts} is after end_ts {end_ts}")
    if is_calendar_timeframe(timeframe):
        return _calendar_gaps(exchange_id, symbol, timeframe, start_ts, end_ts)
    step = timeframe_ms(timeframe)
    stored = _stored_bounds(exchange_id, symbol, timeframe, start_ts, end_ts)
    if stored is None:
        if start_ts is None or end_ts is None:
            return []
        stored_first = first_ts(exchange_id, symbol, timeframe)
        anchor = grid_origin(timeframe) if stored_first is None else stored_first
        first, last = align_up(start_ts, anchor, step), align_down(end_ts, anchor, step)
        return [(first, last)] if first <= last else []
    first, last = stored
    gaps: list[tuple[int, int]] = []
    if start_ts is not None:
        first_slot = align_up(start_ts, first, step)
        if first_slot < first:
            gaps.append((first_slot, first - step))
    if uses_mongo():
        gaps.extend(_mongo_holes(exchange_id, symbol, timeframe, first, last, step))
    else:
        gaps.extend(_sql_holes(exchange_id, symbol, timeframe, first, last, step))
    if end_ts is not None:
        last_slot = align_down(end_ts, last, step)
        if last_slot > last:
            gaps.append((last + step, last_slot))
    return gaps


def _stored_bounds(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> tuple[int, int] | None:
    """First and last stored ts within the bounds: two index lookups, unlike coverage() which counts."""
    if uses_mongo():
        query = mongo_filter(exchange_id, symbol, timeframe, start_ts, end_ts)
        collection = get_mongo_db()[CANDLES]
        first = collection.find_one(query, {"_id": 0, "ts": 1}, sort=[("ts", 1)])
        if first is None:
            return None
        last = collection.find_one(query, {"_id": 0, "ts": 1}, sort=[("ts", -1)])
        return first["ts"], last["ts"]
    # min() and max() alone let PostgreSQL answer each from one end of the index.
    stats = sql_series(Candle, exchange_id, symbol, timeframe, start_ts, end_ts).aggregate(
        first=Min("ts"), last=Max("ts")
    )
    return None if stats["first"] is None else (stats["first"], stats["last"])


def _sql_holes(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int, end_ts: int, step: int
) -> list[tuple[int, int]]:
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


def _mongo_holes(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int, end_ts: int, step: int
) -> list[tuple[int, int]]:
    pipeline = [
        {"$match": mongo_filter(exchange_id, symbol, timeframe, start_ts, end_ts)},
        {"$project": {"_id": 0, "ts": 1}},
        {"$setWindowFields": {"sortBy": {"ts": 1}, "output": {"prev": {"$shift": {"output": "$ts", "by": -1}}}}},
        {"$match": {"$expr": {"$gte": [{"$subtract": ["$ts", "$prev"]}, 2 * step]}}},
        {"$project": {"first": {"$add": ["$prev", step]}, "last": {"$subtract": ["$ts", step]}}},
        {"$sort": {"first": 1}},
    ]
    try:
        holes = get_mongo_db()[CANDLES].aggregate(pipeline, allowDiskUse=True)
        return [(int(doc["first"]), int(doc["last"])) for doc in holes]
    except OperationFailure as error:
        # Servers before 5.0 have no $setWindowFields: stream the ts values (index-covered) instead.
        logger.info("$setWindowFields unavailable (%s); scanning ts values for gaps instead", error)
    return _holes_from_stream(_mongo_ts_stream(exchange_id, symbol, timeframe, start_ts, end_ts), step)


def _mongo_ts_stream(exchange_id: str, symbol: str, timeframe: str, start_ts: int, end_ts: int) -> Iterator[int]:
    cursor = (
        get_mongo_db()[CANDLES]
        .find(mongo_filter(exchange_id, symbol, timeframe, start_ts, end_ts), {"_id": 0, "ts": 1})
        .sort("ts", 1)
        .batch_size(ITER_CHUNK)
    )
    for doc in cursor:
        yield doc["ts"]


def _holes_from_stream(timestamps: Iterable[int], step: int) -> list[tuple[int, int]]:
    holes, previous = [], None
    for ts in timestamps:
        if previous is not None and ts - previous >= 2 * step:
            holes.append((previous + step, ts - step))
        previous = ts
    return holes


def _calendar_gaps(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> list[tuple[int, int]]:
    per_slot = months_per_slot(timeframe)
    stored = [row[0] for row in iter_candles(exchange_id, symbol, timeframe, start_ts, end_ts)]
    stored_months = {month_index(ts) for ts in stored}
    anchor = month_index(stored[0]) if stored else 0

    def slot_at_or_after(ts: int) -> int:
        index = month_index(ts)
        index = anchor + -((anchor - index) // per_slot) * per_slot
        return index if month_start(index) >= ts else index + per_slot

    def slot_at_or_before(ts: int) -> int:
        return anchor + ((month_index(ts) - anchor) // per_slot) * per_slot

    if not stored and (start_ts is None or end_ts is None):
        return []
    first = slot_at_or_after(start_ts) if start_ts is not None else month_index(stored[0])
    last = slot_at_or_before(end_ts) if end_ts is not None else month_index(stored[-1])
    gaps: list[tuple[int, int]] = []
    run_start: int | None = None
    for index in range(first, last + 1, per_slot):
        if index not in stored_months:
            run_start = index if run_start is None else run_start
            continue
        if run_start is not None:
            gaps.append((month_start(run_start), month_start(index - per_slot)))
            run_start = None
    if run_start is not None:
        gaps.append((month_start(run_start), month_start(last)))
    return gaps
