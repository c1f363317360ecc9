"""Live updates: what the processes that commit data publish to the WebSocket hub (`/ws`).

The publishers are the processes that write: `run_scheduler` (a run started; a run finished, with the
candles it stored and their indicator values, the series' open gaps and, at most once a second per
exchange, the exchange's rate-limit bucket) and `backfill` (progress, at most once a second per series,
never the historical candles themselves). Every call here comes after the data's commit, is cheap, and
never raises: a hub that is down costs a log line, not a run.

Two ways to the web processes, chosen by REDIS_URL (see `settings.CHANNEL_LAYERS`):
- Redis (production): messages go to the channel layer (channels-redis pub/sub) from one background
  thread with its own event loop, so a collection thread never waits for Redis.
- Embedded (no REDIS_URL, `make run`): the web and the scheduler are separate processes with no server
  between them but the database, so a message is a row of the outbox table `LiveEvent` (one INSERT);
  each web process polls it and relays new rows to its in-memory layer (`apps.monitoring.hub`). Rows are
  trimmed after `OUTBOX_KEEP_SECONDS`.

Groups (what a WebSocket client subscribes to, `apps.monitoring.hub.HubConsumer`) are named here.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from apps.monitoring.models import LiveEvent
from apps.ratelimits.models import RateLimit
from apps.ratelimits.serializers import available_tokens, circuit_state

if TYPE_CHECKING:  # apps.jobs.models publishes an operator's changes through this module
    from apps.jobs.models import Job, Run

logger = logging.getLogger(__name__)

# A run that stored more candles than this (catching up after a pause) publishes only its newest ones:
# a live client wants the head of the series, and reloads a chart that fell behind.
MAX_CANDLES_PER_RUN = 10
# The rate-limit channel and a backfill's progress: at most one message a second per exchange / series.
RATELIMIT_INTERVAL_SECONDS = 1.0
PROGRESS_INTERVAL_SECONDS = 1.0
# How long outbox rows are kept: long enough for every relay (they poll several times a second).
OUTBOX_KEEP_SECONDS = 300.0
OUTBOX_TRIM_INTERVAL_SECONDS = 60.0
# Messages on their way to Redis beyond this are dropped (Redis hangs): memory stays bounded.
MAX_PENDING = 10_000
# The type of a group message on the channel layer (read by `apps.monitoring.hub.Fanout`, not a consumer).
MESSAGE_TYPE = "live.message"


def series_group(exchange_id: str, symbol: str, timeframe: str) -> str:
    # Group names allow only [a-zA-Z0-9-_.] and fewer than 100 characters; symbols hold / and :.
    digest = hashlib.sha1(f"{exchange_id}\0{symbol}\0{timeframe}".encode()).hexdigest()
    return f"ohlcv.{digest}"


def jobs_group(connector_id: int | None = None) -> str:
    return "jobs" if connector_id is None else f"jobs.connector.{connector_id}"


def ratelimits_group(exchange_id: str | None = None) -> str:
    return "ratelimits" if exchange_id is None else f"ratelimits.{_safe(exchange_id)}"


def gaps_group(exchange_id: str | None = None) -> str:
    return "gaps" if exchange_id is None else f"gaps.{_safe(exchange_id)}"


def _safe(exchange_id: str) -> str:
    # ccxt ids are [a-z0-9]; anything else is hashed so a name can never be refused by the layer.
    if exchange_id.isascii() and exchange_id.replace("_", "").replace("-", "").isalnum() and len(exchange_id) < 60:
        return exchange_id
    return hashlib.sha1(exchange_id.encode()).hexdigest()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class Publisher:
    """Sends payloads to groups from synchronous code without waiting; one per process (`publisher`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[concurrent.futures.Future] = set()
        self._failing = False
        self._trimmed_at = 0.0

    def publish(self, groups: list[str], payload: dict[str, Any]) -> None:
        self.publish_many([(groups, payload)])

    def publish_many(self, messages: list[tuple[list[str], dict[str, Any]]]) -> None:
        """Several payloads, each to its groups: one outbox INSERT for all of them."""
        try:
            if settings.LIVE_OUTBOX:
                self._write_outbox(messages)
            else:
                for groups, payload in messages:
                    self._send_to_layer(groups, payload)
        except Exception as exc:
            self.failed(exc)

    def _write_outbox(self, messages: list[tuple[list[str], dict[str, Any]]]) -> None:
        LiveEvent.objects.append(messages)
        self._succeeded()
        if time.monotonic() - self._trimmed_at >= OUTBOX_TRIM_INTERVAL_SECONDS:
            # Publishers trim too: a deployment without a web process must not grow the table forever.
            self._trimmed_at = time.monotonic()
            LiveEvent.objects.trim(OUTBOX_KEEP_SECONDS)

    def _send_to_layer(self, groups: list[str], payload: dict[str, Any]) -> None:
        if len(self._pending) >= MAX_PENDING:
            raise RuntimeError(f"{MAX_PENDING} messages still on their way to the channel layer")
        future = asyncio.run_coroutine_threadsafe(self._group_send(groups, payload), self._event_loop())
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.discard(future)

    async def _group_send(self, groups: list[str], payload: dict[str, Any]) -> None:
        try:
            layer = get_channel_layer()
            # Serialised once here, not once per client; the id lets a client in two of the groups
            # (all jobs, one connector's) get it once. A web process receives it once per group and
            # fans it out to its sockets (`apps.monitoring.hub.Fanout`).
            event = {"type": MESSAGE_TYPE, "id": uuid.uuid4().hex, "text": json.dumps(payload)}
            for group in groups:
                await layer.group_send(group, {**event, "group": group})
        except Exception as exc:
            self.failed(exc)
        else:
            self._succeeded()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="live-publisher", daemon=True).start()
                self._loop = loop
                # A process that exits right after its last run (run_scheduler --once, backfill) still
                # delivers what it published.
                atexit.register(self.flush)
            return self._loop

    def forget_loop(self) -> None:
        self._lock = threading.Lock()
        self._loop = None
        self._pending = set()

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (up to `timeout`) for the messages still on their way to the channel layer."""
        with self._lock:
            pending = list(self._pending)
        if pending:
            concurrent.futures.wait(pending, timeout=timeout)

    def failed(self, exc: Exception) -> None:
        if not self._failing:
            self._failing = True
            logger.warning("live updates are not delivered: %s: %s", type(exc).__name__, exc)

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("live updates are delivered again")


publisher = Publisher()
# A forked child (backfill --processes) has no copy of the parent's publishing thread: it starts its own.
os.register_at_fork(after_in_child=publisher.forget_loop)
_ratelimit_published: dict[str, float] = {}
_progress_published: dict[int, float] = {}
_throttle_lock = threading.Lock()


def _due(last: dict, key: Any, interval: float) -> bool:
    now = time.monotonic()
    with _throttle_lock:
        if now - last.get(key, -interval) < interval:
            return False
        last[key] = now
        return True


def job_payload(job: Job) -> dict[str, Any]:
    return {
        "id": job.pk,
        "connector": job.connector_id,
        "exchange": job.connector.exchange_id,
        "symbol": job.symbol,
        "timeframe": job.timeframe,
        "status": job.status,
        "cursor": job.cursor,
        "next_run_at": _iso(job.next_run_at),
        "last_error": job.last_error,
        "consecutive_failures": job.consecutive_failures,
    }


def run_payload(run: Run) -> dict[str, Any]:
    return {
        "id": run.pk,
        "status": run.status,
        "worker": run.worker,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "candles_written": run.candles_written,
        "requests": run.requests,
        "error": run.error,
    }


def _job_message(event: str, job: Job, run: Run) -> tuple[list[str], dict[str, Any]]:
    return (
        [jobs_group(), jobs_group(job.connector_id)],
        {"type": "job", "event": event, "job": job_payload(job), "run": run_payload(run)},
    )


def jobs_changed(jobs: Iterable[Job]) -> None:
    """Jobs an operator paused, resumed or made due (committed; admin or API): their new state on `jobs`,
    event `status` (no run)."""
    try:
        for job in jobs:
            publisher.publish(
                [jobs_group(), jobs_group(job.connector_id)],
                {"type": "job", "event": "status", "job": job_payload(job)},
            )
    except Exception as exc:
        publisher.failed(exc)


def run_started(run: Run) -> None:
    """A run has begun (committed): the job shows as running."""
    try:
        publisher.publish(*_job_message("started", run.job, run))
    except Exception as exc:
        publisher.failed(exc)


def run_finished(run: Run, result: Any, candles: bool = True) -> None:
    """A run was released (committed): its job's new state, the candles it stored (with their indicator
    values, as the run computed them), the series' open gaps, in one message batch; and the exchange's
    bucket. `candles=False` for a backfill. Nothing is read back: the release set the job's new state on
    `run.job`, and the result carries the candles."""
    try:
        job = run.job
        messages = [_job_message("finished", job, run)]
        exchange_id = job.connector.exchange_id
        if candles and getattr(result, "candles_written", 0):
            messages += candle_messages(
                exchange_id,
                job.symbol,
                job.timeframe,
                getattr(result, "latest", []),
                getattr(result, "latest_indicators", {}),
            )
        if getattr(result, "gaps_open", 0) or getattr(result, "gaps_refetched", 0):
            messages.append(
                (
                    [gaps_group(), gaps_group(exchange_id)],
                    {
                        "type": "gaps",
                        "exchange": exchange_id,
                        "symbol": job.symbol,
                        "timeframe": job.timeframe,
                        "open": result.gaps_open,
                        "refetched": result.gaps_refetched,
                    },
                )
            )
        publisher.publish_many(messages)
        publish_ratelimit(exchange_id, rate_limited=getattr(result, "rate_limited", 0))
    except Exception as exc:
        publisher.failed(exc)


def candle_messages(
    exchange_id: str, symbol: str, timeframe: str, rows: list, indicators: dict[int, dict[str, float | None]]
) -> list[tuple[list[str], dict[str, Any]]]:
    """The `ohlcv` messages of stored candles (the newest MAX_CANDLES_PER_RUN of `rows`), each with its
    indicator values from `indicators` (by ts)."""
    group = series_group(exchange_id, symbol, timeframe)
    return [
        ([group], candle_payload(exchange_id, symbol, timeframe, *row, indicators.get(row[0], {})))
        for row in rows[-MAX_CANDLES_PER_RUN:]
    ]


def candle_payload(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    ts: int,
    open_: float,
    high: float,
    low: float,
    close: float,
    volume: float,
    indicators: dict[str, float | None],
) -> dict[str, Any]:
    return {
        "type": "ohlcv",
        "exchange": exchange_id,
        "symbol": symbol,
        "timeframe": timeframe,
        "candle": {"ts": ts, "open": open_, "high": high, "low": low, "close": close, "volume": volume},
        "indicators": indicators,
        "published_at": time.time(),
    }


def publish_ratelimit(exchange_id: str, rate_limited: int = 0, force: bool = False) -> None:
    """The exchange's bucket, back-off and circuit: at most once a second per exchange (per process)."""
    try:
        if not force and not _due(_ratelimit_published, exchange_id, RATELIMIT_INTERVAL_SECONDS):
            return
        row = RateLimit.objects.filter(exchange_id=exchange_id).first()
        if row is None:
            return
        publisher.publish([ratelimits_group(), ratelimits_group(exchange_id)], ratelimit_payload(row, rate_limited))
    except Exception as exc:
        publisher.failed(exc)


def ratelimit_payload(row: RateLimit, rate_limited: int = 0) -> dict[str, Any]:
    now = timezone.now()
    tokens = available_tokens(row, now)
    return {
        "type": "ratelimit",
        "exchange": row.exchange_id,
        "tokens": round(tokens, 3),
        "capacity": row.limit,  # what a window may spend, in window mode
        "fill": round(tokens / row.limit, 4) if row.limit else 0.0,
        "refill_per_second": row.refill_per_second,
        "blocked_until": _iso(row.blocked_until) if row.blocked_until and row.blocked_until > now else None,
        "circuit": circuit_state(row, now),
        "granted": row.granted,
        "denied": row.denied,
        "wait_seconds": row.wait_seconds,
        # 429/418 answers the run that published this received (the bucket does not count them).
        "rate_limited": rate_limited,
    }


def backfill_progress(job: Job, progress: Any) -> Any:
    """Wrap a backfill's `progress(slots, candles)` callback so it also publishes the series' progress,
    at most once a second: the candles written so far and the cursor (committed before the callback)."""
    written = 0

    def report(slots: int, candles: int) -> None:
        nonlocal written
        written += candles
        progress(slots, candles)
        if _due(_progress_published, job.pk, PROGRESS_INTERVAL_SECONDS):
            publish_backfill(job, written, done=False)

    return report


def publish_backfill(job: Job, candles_written: int, done: bool) -> None:
    try:
        publisher.publish(
            [jobs_group(), jobs_group(job.connector_id)],
            {
                "type": "backfill",
                "job": job_payload(job),
                "candles_written": candles_written,
                "done": done,
            },
        )
    except Exception as exc:
        publisher.failed(exc)
