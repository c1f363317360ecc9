"""The series store on MongoDB: collections `candles` and `indicators`, plain documents, no ODM.

One of the store's two backends (the other is sqlstore.py, with the same functions); only
`apps.marketdata.store` calls it. Both collections carry a unique index on
`(exchange_id, symbol, timeframe, ts)`, which also serves every query here (equality on the series,
range and sort on ts). Candles are `{exchange_id, symbol, timeframe, ts, open, high, low, close,
volume}`; indicator rows carry their values as a mapping under `values`. Collection `series_stats` holds
one document per series (unique on the series): first_ts, last_ts, candles, anomalies, last_collected_at,
updated by each upsert batch and delete. Anomalies themselves are `Anomaly` rows in the Django database,
like gaps, for every backend.
"""

import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from pymongo import MongoClient, UpdateOne
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from apps.marketdata.models import Anomaly

logger = logging.getLogger(__name__)

CANDLES = "candles"
INDICATORS = "indicators"
STATISTICS = "series_stats"
STATISTICS_FIELDS = ("first_ts", "last_ts", "candles", "anomalies", "last_collected_at")
SERIES_KEY = ("exchange_id", "symbol", "timeframe", "ts")
VALUE_FIELDS = ("open", "high", "low", "close", "volume")

# Operations per bulk message. Mongo caps one at 100,000 operations and 48 MB; 1,000 small upserts keep
# each message well under that and keep a failed batch cheap to retry.
BATCH = 1_000
# Documents per cursor batch when streaming ts values.
STREAM_BATCH = 10_000

# What this backend raises when the server cannot serve a request (unreachable, timed out, refused).
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (PyMongoError,)

# --- The client ---------------------------------------------------------------------------------------

_client_lock = threading.Lock()
_client: Any = None  # pymongo.MongoClient, or a mongomock_ng client injected by tests
_client_pid: int | None = None
_client_injected = False
_indexes_ensured = False

# Fail fast when the server is unreachable instead of pymongo's 30 s default, so a job run fails with a
# clear error and is retried with backoff; allow long reads for a gap aggregation over a huge series.
_CLIENT_DEFAULTS = {
    "appname": "datacollector",
    "serverSelectionTimeoutMS": 5_000,
    "connectTimeoutMS": 5_000,
    "socketTimeoutMS": 300_000,
}


def client_injected() -> bool:
    return _client_injected


def get_client() -> Any:
    """The process's MongoClient, created on first use.

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


def _client_defaults(uri: str) -> dict[str, Any]:
    """Our defaults for the options the URI does not set (pymongo lets keyword arguments win)."""
    given = {key.lower() for key in parse_qs(urlsplit(uri).query)}
    return {key: value for key, value in _CLIENT_DEFAULTS.items() if key.lower() not in given}


def get_db() -> Any:
    """The pymongo Database holding `candles` and `indicators`, with their indexes ensured once per client."""
    db = get_client()[settings.MONGODB_DATABASE]
    if not _indexes_ensured:
        ensure_indexes(db)
    return db


def set_client(client: Any) -> None:
    """Use this client (e.g. `mongomock_ng.MongoClient()`) instead of one built from MONGODB_URI."""
    global _client, _client_pid, _client_injected, _indexes_ensured
    with _client_lock:
        _client, _client_pid, _client_injected, _indexes_ensured = client, os.getpid(), True, False


def reset_client() -> None:
    """Forget the current client (closing it unless it was injected); the next use builds a new one."""
    global _client, _client_pid, _client_injected, _indexes_ensured
    with _client_lock:
        if _client is not None and not _client_injected:
            _client.close()
        _client, _client_pid, _client_injected, _indexes_ensured = None, None, False, False


def ensure_indexes(db: Any = None) -> None:
    """Create the unique series keys of `candles` and `indicators` if missing. Idempotent and cheap."""
    global _indexes_ensured
    db = db if db is not None else get_client()[settings.MONGODB_DATABASE]
    key = [(field, 1) for field in SERIES_KEY]
    for name in (CANDLES, INDICATORS):
        db[name].create_index(key, unique=True, name="series_ts_unique")
    db[STATISTICS].create_index([(field, 1) for field in SERIES_KEY[:3]], unique=True, name="series_unique")
    _indexes_ensured = True


def series_filter(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> dict[str, Any]:
    """The filter of one series, `ts` bounds inclusive (candles and indicators alike)."""
    query: dict[str, Any] = {"exchange_id": exchange_id, "symbol": symbol, "timeframe": timeframe}
    bounds_ = {}
    if start_ts is not None:
        bounds_["$gte"] = start_ts
    if end_ts is not None:
        bounds_["$lte"] = end_ts
    if bounds_:
        query["ts"] = bounds_
    return query


def _bulk_upsert(collection: Any, operations: list) -> Any:
    try:
        return collection.bulk_write(operations, ordered=False)
    except BulkWriteError as error:
        # Two writers upserting the same new key at once: one may lose the race with a duplicate key
        # error (servers before 4.2 do not retry that themselves). The loser's key now exists, so the
        # same batch again turns its inserts into matches.
        if any(e.get("code") != 11000 for e in error.details.get("writeErrors", [])):
            raise
        logger.info("Retrying a batch after a concurrent insert of the same keys")
        return collection.bulk_write(operations, ordered=False)


# --- Candles ----------------------------------------------------------------------------------------


def upsert_candles(
    exchange_id: str, symbol: str, timeframe: str, rows: list[tuple], flagged: list[tuple]
) -> tuple[int, int, int]:
    """Unordered bulk upserts of `$set` on the values: (inserted, updated, unchanged).

    MongoDB itself tells the three outcomes apart: an upsert that matched nothing inserts
    (`upserted_count`); one that matched counts in `matched_count`, and only a `$set` that actually
    changes a value counts in `modified_count` (the server compares old and new values and skips the
    write, and the oplog entry, for an identical document). So unchanged = matched - modified, with no
    read before the write and one round trip per batch. A filter of the form "key and any value differs"
    would not work: with upsert=True a non-matching filter means "insert", which would then collide with
    the unique index.

    After each batch, one `update_one` brings the series' statistics document up to date. Anomalies are
    written (Django database) only when the batch has some, or revised candles whose old anomalies may
    be gone now: MongoDB does not say which candles it modified, so then the batch's ts are checked.
    """
    db = get_db()
    collection = db[CANDLES]
    series = {"exchange_id": exchange_id, "symbol": symbol, "timeframe": timeframe}
    inserted = updated = unchanged = 0
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        operations = [
            UpdateOne(
                {**series, "ts": ts},
                {"$set": {"open": o, "high": h, "low": lo, "close": c, "volume": v}},
                upsert=True,
            )
            for ts, o, h, lo, c, v in batch
        ]
        outcome = _bulk_upsert(collection, operations)
        inserted += outcome.upserted_count
        updated += outcome.modified_count
        unchanged += outcome.matched_count - outcome.modified_count
        first, last = batch[0][0], batch[-1][0]
        batch_flagged = [row for row in flagged if first <= row[0] <= last]
        revised = [row[0] for row in batch] if outcome.modified_count else []
        anomalies = (
            Anomaly.objects.record(exchange_id, symbol, timeframe, batch_flagged, revised)
            if batch_flagged or revised
            else 0
        )
        db[STATISTICS].update_one(
            series,
            {
                "$min": {"first_ts": first},
                "$max": {"last_ts": last},
                "$inc": {"candles": outcome.upserted_count, "anomalies": anomalies},
                "$set": {"last_collected_at": timezone.now()},
            },
            upsert=True,
        )
    return inserted, updated, unchanged


def delete_candles(exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None) -> int:
    """Delete the candles in the bounds, then their anomalies, then correct the statistics document."""
    db = get_db()
    deleted = db[CANDLES].delete_many(series_filter(exchange_id, symbol, timeframe, start_ts, end_ts)).deleted_count
    if deleted:
        series = series_filter(exchange_id, symbol, timeframe)
        stats = db[STATISTICS].find_one(series, {"_id": 0, "anomalies": 1}) or {}
        anomalies = 0
        if stats.get("anomalies"):
            # Only then: the Django database need not be reachable to delete candles of a clean series.
            anomalies, _ = Anomaly.objects.for_series(exchange_id, symbol, timeframe).within(start_ts, end_ts).delete()
        first = first_ts(exchange_id, symbol, timeframe)
        if first is None:
            db[STATISTICS].delete_one(series)
        else:
            db[STATISTICS].update_one(
                series,
                {
                    "$set": {"first_ts": first, "last_ts": last_ts(exchange_id, symbol, timeframe)},
                    "$inc": {"candles": -deleted, "anomalies": -anomalies},
                },
            )
    return deleted


# --- Statistics -------------------------------------------------------------------------------------


def series_statistics(filters: dict[str, str], offset: int, limit: int | None) -> list[tuple]:
    cursor = (
        get_db()[STATISTICS]
        .find(filters, {"_id": 0})
        .sort([("exchange_id", 1), ("symbol", 1), ("timeframe", 1)])
        .skip(offset)
    )
    if limit is not None:
        cursor = cursor.limit(limit)
    return [
        (
            doc["exchange_id"],
            doc["symbol"],
            doc["timeframe"],
            *(doc.get(field, 0) for field in STATISTICS_FIELDS[:4]),
            doc.get("last_collected_at"),
        )
        for doc in cursor
    ]


def count_series_statistics(filters: dict[str, str]) -> int:
    return get_db()[STATISTICS].count_documents(filters)


def rebuild_statistics(find_anomalies: Callable[[list[tuple]], list[tuple]]) -> int:
    """Statistics and anomalies recomputed from the candles (a grouped pass, then the odd candles)."""
    db = get_db()
    odd = {
        "$expr": {
            "$or": [
                {"$lt": ["$high", "$open"]},
                {"$lt": ["$high", "$close"]},
                {"$lt": ["$high", "$low"]},
                {"$gt": ["$low", "$open"]},
                {"$gt": ["$low", "$close"]},
            ]
        }
    }
    by_series: dict[tuple[str, str, str], list[tuple]] = {}
    for doc in db[CANDLES].find(odd, {"_id": 0}).sort([(field, 1) for field in SERIES_KEY]):
        key = (doc["exchange_id"], doc["symbol"], doc["timeframe"])
        by_series.setdefault(key, []).append((doc["ts"], *(doc[field] for field in VALUE_FIELDS)))
    collected = {
        (doc["exchange_id"], doc["symbol"], doc["timeframe"]): doc.get("last_collected_at")
        for doc in db[STATISTICS].find(
            {}, {"_id": 0, "exchange_id": 1, "symbol": 1, "timeframe": 1, "last_collected_at": 1}
        )
    }
    Anomaly.objects.all().delete()
    anomalies = {key: Anomaly.objects.record(*key, find_anomalies(rows), []) for key, rows in by_series.items()}
    series = series_coverage()
    db[STATISTICS].delete_many({})
    if series:
        db[STATISTICS].insert_many(
            [
                {
                    "exchange_id": e,
                    "symbol": s,
                    "timeframe": t,
                    "first_ts": first,
                    "last_ts": last,
                    "candles": count,
                    "anomalies": anomalies.get((e, s, t), 0),
                    "last_collected_at": collected.get((e, s, t)),
                }
                for e, s, t, first, last, count in series
            ]
        )
    return len(series)


def read_candles(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None, limit: int | None
) -> list[list]:
    cursor = (
        get_db()[CANDLES]
        .find(
            series_filter(exchange_id, symbol, timeframe, start_ts, end_ts),
            {"_id": 0, "ts": 1, **dict.fromkeys(VALUE_FIELDS, 1)},
        )
        .sort("ts", 1)
    )
    if limit is not None:
        cursor = cursor.limit(limit)
    return [[doc["ts"], doc["open"], doc["high"], doc["low"], doc["close"], doc["volume"]] for doc in cursor]


def read_closes(exchange_id: str, symbol: str, timeframe: str, start_ts: int) -> tuple[np.ndarray, np.ndarray]:
    cursor = (
        get_db()[CANDLES]
        .find(series_filter(exchange_id, symbol, timeframe, start_ts, None), {"_id": 0, "ts": 1, "close": 1})
        .sort("ts", 1)
    )
    rows = [(doc["ts"], doc["close"]) for doc in cursor]
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=float)
    ts, close = zip(*rows, strict=True)
    return np.array(ts, dtype=np.int64), np.array(close, dtype=float)


def iter_candle_columns(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None, chunk_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """The candles in the bounds as column arrays, `chunk_size` rows per chunk, ascending ts.

    One cursor over the range, read in batches of `chunk_size` documents (the server keeps the cursor
    between batches, so memory stays at one chunk on both sides).
    """
    fields = ("ts", *VALUE_FIELDS)
    cursor = (
        get_db()[CANDLES]
        .find(series_filter(exchange_id, symbol, timeframe, start_ts, end_ts), dict.fromkeys(fields, 1) | {"_id": 0})
        .sort("ts", 1)
        .batch_size(chunk_size)
    )
    rows: list[tuple] = []
    for doc in cursor:
        rows.append((doc["ts"], doc["open"], doc["high"], doc["low"], doc["close"], doc["volume"]))
        if len(rows) == chunk_size:
            yield _columns(rows)
            rows = []
    if rows:
        yield _columns(rows)


def _columns(rows: list[tuple]) -> dict[str, np.ndarray]:
    table = np.array(rows, dtype=[("ts", "i8"), *((field, "f8") for field in VALUE_FIELDS)])
    return {field: np.ascontiguousarray(table[field]) for field in ("ts", *VALUE_FIELDS)}


def _end_ts(query: dict[str, Any], direction: int) -> int | None:
    doc = get_db()[CANDLES].find_one(query, {"_id": 0, "ts": 1}, sort=[("ts", direction)])
    return None if doc is None else doc["ts"]


def first_ts(exchange_id: str, symbol: str, timeframe: str) -> int | None:
    return _end_ts(series_filter(exchange_id, symbol, timeframe), 1)


def last_ts(exchange_id: str, symbol: str, timeframe: str) -> int | None:
    return _end_ts(series_filter(exchange_id, symbol, timeframe), -1)


def bounds(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> tuple[int, int] | None:
    query = series_filter(exchange_id, symbol, timeframe, start_ts, end_ts)
    first = _end_ts(query, 1)
    return None if first is None else (first, _end_ts(query, -1))  # type: ignore[return-value]


def coverage(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> tuple[int | None, int | None, int]:
    found = bounds(exchange_id, symbol, timeframe, start_ts, end_ts)
    if found is None:
        return None, None, 0
    query = series_filter(exchange_id, symbol, timeframe, start_ts, end_ts)
    return found[0], found[1], get_db()[CANDLES].count_documents(query)


def series_coverage() -> list[tuple[str, str, str, int, int, int]]:
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
        (
            doc["_id"]["exchange_id"],
            doc["_id"]["symbol"],
            doc["_id"]["timeframe"],
            doc["first_ts"],
            doc["last_ts"],
            doc["count"],
        )
        for doc in get_db()[CANDLES].aggregate(pipeline, allowDiskUse=True)
    ]


def holes(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int, end_ts: int, step: int
) -> list[tuple[int, int]]:
    """Missing slots between stored candles, found with $setWindowFields and $shift on the server."""
    pipeline = [
        {"$match": series_filter(exchange_id, symbol, timeframe, start_ts, end_ts)},
        {"$project": {"_id": 0, "ts": 1}},
        {"$setWindowFields": {"sortBy": {"ts": 1}, "output": {"prev": {"$shift": {"output": "$ts", "by": -1}}}}},
        {"$match": {"$expr": {"$gte": [{"$subtract": ["$ts", "$prev"]}, 2 * step]}}},
        {"$project": {"first": {"$add": ["$prev", step]}, "last": {"$subtract": ["$ts", step]}}},
        {"$sort": {"first": 1}},
    ]
    try:
        found = get_db()[CANDLES].aggregate(pipeline, allowDiskUse=True)
        return [(int(doc["first"]), int(doc["last"])) for doc in found]
    except OperationFailure as error:
        # Servers before 5.0 have no $setWindowFields: stream the ts values (index-covered) instead.
        logger.info("$setWindowFields unavailable (%s); scanning ts values for gaps instead", error)
    return holes_from_stream(_ts_stream(exchange_id, symbol, timeframe, start_ts, end_ts), step)


def _ts_stream(exchange_id: str, symbol: str, timeframe: str, start_ts: int, end_ts: int) -> Iterator[int]:
    cursor = (
        get_db()[CANDLES]
        .find(series_filter(exchange_id, symbol, timeframe, start_ts, end_ts), {"_id": 0, "ts": 1})
        .sort("ts", 1)
        .batch_size(STREAM_BATCH)
    )
    for doc in cursor:
        yield doc["ts"]


def holes_from_stream(timestamps: Iterable[int], step: int) -> list[tuple[int, int]]:
    found, previous = [], None
    for ts in timestamps:
        if previous is not None and ts - previous >= 2 * step:
            found.append((previous + step, ts - step))
        previous = ts
    return found


# --- Indicator rows ---------------------------------------------------------------------------------


def _documents(ts: np.ndarray, columns: dict[str, np.ndarray]) -> Iterable[tuple[int, dict[str, float | None]]]:
    names = list(columns)
    # One list of Python floats per column, then NaN -> None, is much faster than per-cell numpy access.
    lists = [[None if math.isnan(v) else v for v in columns[name].tolist()] for name in names]
    for i, key in enumerate(ts.tolist()):
        yield key, {name: values[i] for name, values in zip(names, lists, strict=True)}


def write_indicators(
    exchange_id: str, symbol: str, timeframe: str, ts: np.ndarray, columns: dict[str, np.ndarray]
) -> None:
    collection = get_db()[INDICATORS]
    operations = [
        UpdateOne(
            {"exchange_id": exchange_id, "symbol": symbol, "timeframe": timeframe, "ts": key},
            {"$set": {"values": values}},
            upsert=True,
        )
        for key, values in _documents(ts, columns)
    ]
    for start in range(0, len(operations), BATCH):
        _bulk_upsert(collection, operations[start : start + BATCH])


def read_indicators(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None, limit: int | None
) -> list[tuple[int, dict[str, float | None]]]:
    cursor = (
        get_db()[INDICATORS]
        .find(series_filter(exchange_id, symbol, timeframe, start_ts, end_ts), {"_id": 0, "ts": 1, "values": 1})
        .sort("ts", 1)
    )
    if limit is not None:
        cursor = cursor.limit(limit)
    return [(doc["ts"], doc.get("values") or {}) for doc in cursor]


def indicator_ts(exchange_id: str, symbol: str, timeframe: str) -> np.ndarray:
    query = series_filter(exchange_id, symbol, timeframe)
    return np.array([doc["ts"] for doc in get_db()[INDICATORS].find(query, {"_id": 0, "ts": 1})], dtype=np.int64)


def delete_indicators(exchange_id: str, symbol: str, timeframe: str, ts: list[int]) -> None:
    get_db()[INDICATORS].delete_many({**series_filter(exchange_id, symbol, timeframe), "ts": {"$in": ts}})


def delete_indicator_range(
    exchange_id: str, symbol: str, timeframe: str, start_ts: int | None, end_ts: int | None
) -> int:
    query = series_filter(exchange_id, symbol, timeframe, start_ts, end_ts)
    return get_db()[INDICATORS].delete_many(query).deleted_count
