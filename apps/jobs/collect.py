"""Collection of one job: page an exchange's candles from the job's cursor to the last closed candle.

The scheduler calls `collect_job()` for each claimed job; `manage.py backfill` calls it too. Per page:
fetch (the client takes the request's weight from the shared rate limit first), keep only closed
candles of the asked range, upsert them, advance `job.cursor` and commit it in one UPDATE, heartbeat.
A crash therefore loses at most one page of work, and the next run continues after the cursor.
Backfill prefetches (`prefetch`): the next pages' requests are already on their way, from helper
threads, while a page is written; pages are still written and the cursor committed in order, one by one.

How exchange quirks are handled:
- A short page is not the end of the data: the next page starts after the last candle received, so the
  rest is asked for again. Only the exchange's server time (fetched once per run) ends the paging.
- An empty page (ccxt turns a truncated 200 body into one) is asked again a few times. If it stays empty
  the collector looks further ahead without moving the cursor: data found later is stored and the slots
  in between become a gap; nothing found up to "now" leaves the cursor where it was, so the next run
  asks again instead of skipping the tail.
- Holes in the exchange's own data are recorded as gaps (`apps.marketdata.gaps.sync_gaps`) and asked for
  again on the next runs until the exchange has returned them empty often enough to be confirmed empty.
  Nothing is ever interpolated.
"""

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from django.db import connections
from django.db.models import Q

from apps.connectors.exchanges import ExchangeClient, get_client
from apps.jobs.models import Job, Run
from apps.marketdata import store
from apps.marketdata.indicators import refresh_indicators
from apps.marketdata.timeframes import datetime_to_ms, ms_to_datetime, timeframe_ms
from apps.monitoring.metrics import CANDLES, series_labels
from datacollector.config import get_config

logger = logging.getLogger(__name__)

# Times an empty page is asked again before the collector looks further ahead.
EMPTY_PAGE_RETRIES = 3
# Gaps refetched per run: old gaps must not starve the collection of new candles.
MAX_GAP_REFETCHES_PER_RUN = 20
# Pages one scheduled run may fetch before handing the worker back (`result.more` asks for another
# run at once), so one job with years of history cannot starve the others. Backfill has no such cap.
MAX_PAGES_PER_RUN = 200
# Indicators are brought up to date after this many candles are written, not only at the end of a run:
# a backfill of a long range then ends with one chunk to compute instead of the whole series (seconds in
# which no page is fetched, and the whole series in memory at once). While a chunk is computed the
# series' pages wait; the shared bucket keeps the tokens for the other series or, up to its burst, for
# this one afterwards. A scheduled run writes fewer candles and computes once, at its end.
INDICATOR_CHUNK_CANDLES = 50_000
# The Run row's counters are refreshed at most this often while a job runs (the final values are
# written by whoever finishes the run).
RUN_PROGRESS_INTERVAL_SECONDS = 2.0

# How many of a run's newest candles (with their indicator values) it keeps for live subscribers.
LATEST_KEPT = 10

Progress = Callable[[int, int], None]  # (slots covered, candles written) since the last call


@dataclasses.dataclass
class CollectResult:
    candles_fetched: int = 0  # rows the exchange returned
    candles_written: int = 0  # candles that changed the store (new or revised)
    requests: int = 0
    rate_limit_wait: float = 0.0  # seconds waited for the shared rate limit
    rate_limited: int = 0  # 429/418 answers received
    pages: int = 0
    empty_pages: int = 0
    dropped: int = 0  # rows outside the asked range, the forming candle, duplicates, unreadable rows
    gaps_open: int = 0  # open gaps of the series after this run
    gaps_refetched: int = 0
    first_ts: int | None = None  # earliest candle written
    last_ts: int | None = None  # latest candle written
    stopped: bool = False  # a stop was requested and the run ended after the current page
    # More history is waiting: the run reached its page budget. The scheduler runs the job again at once.
    more: bool = False
    # The cursor reached the end of the range (the last closed candle, or `until`). False when pages
    # near the end stayed empty: the next run (or a backfill's next pass) asks for them again.
    complete: bool = False
    # The newest candles written (at most LATEST_KEPT, oldest first) and their indicator values by ts: what
    # the run publishes to live subscribers once it is released, without reading them back.
    latest: list[list[float]] = dataclasses.field(default_factory=list, repr=False)
    latest_indicators: dict[int, dict[str, float | None]] = dataclasses.field(default_factory=dict, repr=False)

    def __add__(self, other: "CollectResult") -> "CollectResult":
        """Two passes over one job as one: counts add up, the state is the later pass's."""
        total = dataclasses.replace(other)
        for name in ("candles_fetched", "candles_written", "requests", "rate_limit_wait", "rate_limited", "pages"):
            setattr(total, name, getattr(self, name) + getattr(other, name))
        for name in ("empty_pages", "dropped", "gaps_refetched"):
            setattr(total, name, getattr(self, name) + getattr(other, name))
        firsts = [ts for ts in (self.first_ts, other.first_ts) if ts is not None]
        lasts = [ts for ts in (self.last_ts, other.last_ts) if ts is not None]
        total.first_ts, total.last_ts = min(firsts, default=None), max(lasts, default=None)
        return total


class CollectionFailed(Exception):
    """A collection ended by `error` (also its `__cause__`); `result` is what it did before.

    Pages stored before the error stay stored and the job's cursor says so; the result carries the
    counts for the Run row and the backfill summary. Whoever handles the failure looks at `error`:
    a lost lease, a permanent exchange error, a database error, anything else.
    """

    def __init__(self, result: CollectResult, error: Exception) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.result = result
        self.error = error


def clean_rows(raw: Sequence[Any], start: int, end: int) -> tuple[list[list[float]], int]:
    """The rows of `raw` that are candles opening in [start, end], one per ts, ascending.

    Returns (rows, dropped). `end` is at most the last closed open time, so the forming candle, which
    exchanges include at the end of the newest page, is dropped here. Rows that cannot be a candle (a
    missing value, NaN, a negative price or volume) are dropped and logged rather than rejecting the page:
    the slot then shows up as a gap and is asked for again.
    """
    by_ts: dict[int, list[float]] = {}
    dropped = 0
    isfinite = math.isfinite
    for row in raw:
        # Fast path for what the client returns (an int and five floats); this loop runs for every candle
        # collected. A NaN anywhere fails a comparison; an infinity makes the sum non-finite, and so can an
        # overflow of huge but finite values, which the full checks below then accept.
        if type(row) is list and len(row) >= 6:
            ts, o, h, lo, c, v = row[0], row[1], row[2], row[3], row[4], row[5]
            if (
                type(ts) is int
                and type(o) is float
                and type(h) is float
                and type(lo) is float
                and type(c) is float
                and type(v) is float
                and o >= 0
                and h >= 0
                and lo >= 0
                and c >= 0
                and v >= 0
                and isfinite(o + h + lo + c + v)
            ):
                if not start <= ts <= end:
                    dropped += 1
                    continue
                if ts in by_ts:
                    dropped += 1
                by_ts[ts] = [ts, o, h, lo, c, v]
                continue
        try:
            ts = int(row[0])
            values = [float(v) for v in row[1:6]]
        except (TypeError, ValueError, IndexError):
            dropped += 1
            logger.warning("dropping an unreadable candle row: %r", row)
            continue
        if not start <= ts <= end:
            dropped += 1
            continue
        if len(values) != 5 or not all(math.isfinite(v) and v >= 0 for v in values):
            dropped += 1
            logger.warning("dropping a candle with invalid values: %r", row)
            continue
        if ts in by_ts:
            dropped += 1
        by_ts[ts] = [ts, *values]
    return [by_ts[ts] for ts in sorted(by_ts)], dropped


class _Inline:
    """A page request sent when its result is asked for: sequential collection."""

    def __init__(self, fetch: Callable[[], list]) -> None:
        self._fetch = fetch

    def result(self) -> list:
        return self._fetch()


@dataclasses.dataclass
class _Request:
    since: int
    limit: int
    future: "Future[list] | _Inline"


class _Fetcher:
    """Sends a collection's page requests: inline, or (prefetching) from `depth` helper threads.

    Each helper has its own client (ccxt instances are not shared between threads) and its own database
    connection for the shared rate limit and circuit breaker, so every request still takes its weight from
    the shared bucket first. With a depth above 1, the pages after the next are guessed, assuming each
    page comes back full (the rule while a history is paged); a guess is used only when it asks exactly
    what the sequential paging asks next, else it is dropped (its weight was spent for nothing).
    """

    def __init__(self, job: Job, client: ExchangeClient, step: int, page_limit: int, depth: int) -> None:
        self.job = job
        self.client = client
        self.step = step
        self.page_limit = page_limit
        self.depth = depth
        # Each client used, with its counters when this run started using it.
        self.clients: list[tuple[ExchangeClient, Any]] = [(client, client.stats.snapshot())]
        self.guesses_dropped = 0
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="prefetch") if depth > 0 else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: collections.deque[_Request] = collections.deque()

    def request(self, since: int, limit: int, end: int) -> "_Request":
        """The request of the page at `since`: sent now, or a guess already on its way."""
        if self._pool is None:
            return _Request(since, limit, _Inline(functools.partial(self._fetch, self.client, since, limit)))
        if self._pending and (self._pending[0].since, self._pending[0].limit) != (since, limit):
            # The paging went elsewhere (a short or empty page, a hole): every guess after it is off too.
            self.guesses_dropped += len(self._pending)
            self._pending.clear()
        request = self._pending.popleft() if self._pending else self._submit(since, limit)
        guess = self._pending[-1] if self._pending else request
        while len(self._pending) < self.depth - 1:
            # Where the page after `guess` starts if `guess` comes back full (exchanges answer from the
            # first open time at or after `since`).
            next_since = -(-guess.since // self.step) * self.step + guess.limit * self.step
            if next_since > end:
                break
            guess = self._submit(next_since, max(1, min(self.page_limit, (end - next_since) // self.step + 2)))
            self._pending.append(guess)
        return request

    def _submit(self, since: int, limit: int) -> "_Request":
        assert self._pool is not None
        return _Request(since, limit, self._pool.submit(self._fetch_in_helper, since, limit))

    def _fetch(self, client: ExchangeClient, since: int, limit: int) -> list:
        return client.fetch_ohlcv(self.job.symbol, self.job.timeframe, since, limit)

    def _fetch_in_helper(self, since: int, limit: int) -> list:
        client = getattr(self._local, "client", None)
        if client is None:
            with self._lock:
                client = get_client(self.job.connector)
                self.clients.append((client, client.stats.snapshot()))
                # One helper at a time loads the markets: the first puts them in the process' cache for
                # the others (Binance's exchangeInfo weighs 20), instead of each loading them at once.
                client.markets()
            self._local.client = client
        return self._fetch(client, since, limit)

    def close(self) -> None:
        """Wait for the requests still on their way, then close each helper's database connection."""
        if self._pool is None:
            return
        self.guesses_dropped += len(self._pending)
        self._pending.clear()
        # One task per helper thread: each waits at the barrier until all run, so no thread runs two.
        barrier = threading.Barrier(self.depth)

        def close_connections() -> None:
            barrier.wait(timeout=600)
            connections.close_all()

        tasks = [self._pool.submit(close_connections) for _ in range(self.depth)]
        for task in tasks:
            with contextlib.suppress(Exception):
                task.result()
        self._pool.shutdown()
        self._pool = None


class _Collection:
    """The state of one run of one job; `collect_job()` is its only user."""

    def __init__(
        self,
        job: Job,
        run: Run | None,
        client: ExchangeClient,
        heartbeat: Callable[[], Any],
        progress: Progress | None,
        stop: threading.Event | None,
        max_pages: int | None,
        prefetch: int = 0,
    ) -> None:
        self.job = job
        self.max_pages = max_pages
        self.run = run
        self.client = client
        self.heartbeat = heartbeat
        self.progress = progress
        self.stop = stop
        self.series = (job.connector.exchange_id, job.symbol, job.timeframe)
        self.step = timeframe_ms(job.timeframe)
        self.page_limit = client.page_limit()
        self.result = CollectResult()
        # Start of the earliest window passed over after it stayed empty: before the first stored candle
        # it would otherwise look like history before the listing, so gap detection starts there.
        self.skipped_from: int | None = None
        # Set when the exchange answered with later candles only: nothing exists up to this open time.
        self.nothing_before: int | None = None
        # Earliest candle written since the indicators were last brought up to date, and the count since.
        self.indicators_from: int | None = None
        self.indicators_pending = 0
        self.fetcher = _Fetcher(job, client, self.step, self.page_limit, prefetch)
        self._run_saved_at = time.monotonic()
        # The next open time while every candle written so far extended the series slot by slot right
        # after the cursor the run started from; None once one did not (see `appended_only`).
        self.appending: int | None = job.cursor + self.step if job.cursor is not None else None
        self.had_open_gaps = True  # until refetch_gaps finds none

    def refresh_counters(self) -> None:
        clients = list(self.fetcher.clients)
        self.result.requests = sum(c.stats.requests - before.requests for c, before in clients)
        self.result.rate_limit_wait = sum(c.stats.rate_limit_wait - before.rate_limit_wait for c, before in clients)
        self.result.rate_limited = sum(c.stats.rate_limited - before.rate_limited for c, before in clients)

    def _after_page(self) -> None:
        self.refresh_counters()
        self.heartbeat()
        if self.run is not None and time.monotonic() - self._run_saved_at >= RUN_PROGRESS_INTERVAL_SECONDS:
            self._run_saved_at = time.monotonic()
            Run.objects.filter(pk=self.run.pk).update(
                candles_fetched=self.result.candles_fetched,
                candles_written=self.result.candles_written,
                requests=self.result.requests,
                rate_limit_wait=self.result.rate_limit_wait,
            )

    def _save_cursor(self, ts: int) -> None:
        # One UPDATE per page, and never backwards: a cursor only ever grows.
        Job.objects.filter(pk=self.job.pk).filter(Q(cursor__isnull=True) | Q(cursor__lt=ts)).update(cursor=ts)
        self.job.cursor = ts

    def _write(self, rows: list[list[float]]) -> int:
        if not rows:
            return 0
        written = store.upsert_candles(*self.series, rows)
        count = written.inserted + written.updated
        self.result.candles_written += count
        if count:
            CANDLES.labels(*series_labels(*self.series)).inc(count)
            first, last = rows[0][0], rows[-1][0]
            self.result.first_ts = first if self.result.first_ts is None else min(self.result.first_ts, first)
            self.result.last_ts = last if self.result.last_ts is None else max(self.result.last_ts, last)
            self.indicators_from = first if self.indicators_from is None else min(self.indicators_from, first)
            kept = {row[0]: row for row in self.result.latest}
            kept.update((row[0], row) for row in rows[-LATEST_KEPT:])
            self.result.latest = [kept[ts] for ts in sorted(kept)[-LATEST_KEPT:]]
            self.indicators_pending += count
            if self.indicators_pending >= INDICATOR_CHUNK_CANDLES:
                self.update_indicators()
        return len(rows)

    def update_indicators(self) -> None:
        """Compute the indicators from the earliest candle written since the last time to the series' end."""
        if self.indicators_from is not None:
            latest = self.result.latest_indicators
            latest.update(refresh_indicators(*self.series, self.indicators_from).latest(LATEST_KEPT))
            self.result.latest_indicators = {ts: latest[ts] for ts in sorted(latest)[-LATEST_KEPT:]}
        self.indicators_from, self.indicators_pending = None, 0

    def _request(self, since: int, end: int) -> "_Request | None":
        """Start fetching the page at `since` (in the helper thread when prefetching), or None when the
        range is done, a stop was requested or the run's page budget is spent."""
        if since > end:
            return None
        if self.stop is not None and self.stop.is_set():
            self.result.stopped = True
            return None
        if self.max_pages is not None and self.result.pages >= self.max_pages:
            self.result.more = True
            return None
        # One slot more than the range holds, so a page reaching `end` is recognisably complete.
        limit = max(1, min(self.page_limit, (end - since) // self.step + 2))
        return self.fetcher.request(since, limit, end)

    def page_range(self, start: int, end: int, move_cursor: bool) -> int:
        """Fetch every candle opening in [start, end]; returns how many were received and stored.

        Where the next page starts depends only on the page received, so it is requested (when
        prefetching) before this page is written: the request's latency and the store's writes overlap,
        and the cursor still moves page by page, in order.
        """
        empty_tries = 0
        stored = 0
        request = self._request(start, end)
        while request is not None:
            if self.stop is not None and self.stop.is_set():
                # A page already on its way is dropped: the cursor says where the next run starts.
                self.result.stopped = True
                break
            since, limit = request.since, request.limit
            raw = request.future.result()
            self.result.pages += 1
            self.result.candles_fetched += len(raw)
            rows, dropped = clean_rows(raw, since, end)
            self.result.dropped += dropped
            covered = 0  # slots passed over without candles, for the progress callback
            if rows:
                empty_tries = 0
                next_since = rows[-1][0] + self.step
            else:
                self.result.empty_pages += 1
                next_since = since
                if any(_ts(row) is not None and _ts(row) > end for row in raw):
                    self.nothing_before = end
                    # The exchange answered with candles after the range only: there is nothing in it
                    # (a hole, or before the listing). Whatever lies between is a gap, if anything.
                    covered = (end + self.step - since) // self.step
                    next_since = end + 1
                elif empty_tries < EMPTY_PAGE_RETRIES:
                    # Before "now" an empty page is never the end of the data: ask again.
                    empty_tries += 1
                else:
                    # Still empty: look further ahead, leaving the cursor behind (see the module doc).
                    empty_tries = 0
                    self.skipped_from = since if self.skipped_from is None else min(self.skipped_from, since)
                    covered = min(limit, (end - since) // self.step + 1)
                    next_since = since + covered * self.step
            request = self._request(next_since, end)
            if rows:
                stored += self._write(rows)
                last = rows[-1][0]
                contiguous = rows[0][0] == self.appending and last - rows[0][0] == (len(rows) - 1) * self.step
                self.appending = last + self.step if move_cursor and contiguous else None
                if move_cursor:
                    self._save_cursor(last)
                if self.progress is not None:
                    self.progress((last + self.step - since) // self.step, len(rows))
            elif covered and self.progress is not None:
                self.progress(covered, 0)
            self._after_page()
        return stored

    def appended_only(self) -> bool:
        """Every candle this run wrote extended the series slot by slot right after its cursor: no slot
        can have gone missing, so there is no new gap to record (the live case: one new candle a run)."""
        return self.appending is not None and self.skipped_from is None and self.result.first_ts is not None

    def refetch_gaps(self, gaps_module: Any) -> None:
        if self.appended_only() and _no_open_gaps_lately(self.series):
            self.had_open_gaps = False
            return
        gaps = gaps_module.gaps_to_refetch(*self.series)
        self.had_open_gaps = bool(gaps)
        _remember_open_gaps(self.series, bool(gaps))
        for gap in gaps[:MAX_GAP_REFETCHES_PER_RUN]:
            if self.stop is not None and self.stop.is_set():
                self.result.stopped = True
                return
            self.nothing_before = None
            found = self.page_range(gap.start_ts, gap.end_ts, move_cursor=False)
            self.result.gaps_refetched += 1
            first = store.first_ts(*self.series)
            if not found and self.nothing_before == gap.end_ts and first == gap.end_ts + self.step:
                # A "gap" before the first stored candle that the exchange answers with later candles
                # only is history before the listing (left over from pages that came back empty).
                gap.delete()
                continue
            # Found candles: the gap shrinks, splits or disappears; none: one more empty attempt.
            gaps_module.record_refetch(gap, found)


# Series this process found without open gaps, and when (monotonic). A run that only appended cannot have
# opened one, so the next such runs skip asking for GAPS_RECHECK_SECONDS: one query less on every live run.
# Gaps recorded meanwhile by others (a backfill, the admin, another process) are picked up after that.
GAPS_RECHECK_SECONDS = 300.0
_no_open_gaps: dict[tuple[str, str, str], float] = {}
_no_open_gaps_lock = threading.Lock()


def _no_open_gaps_lately(series: tuple[str, str, str]) -> bool:
    with _no_open_gaps_lock:
        checked = _no_open_gaps.get(series)
    return checked is not None and time.monotonic() - checked < GAPS_RECHECK_SECONDS


def _remember_open_gaps(series: tuple[str, str, str], any_open: bool) -> None:
    with _no_open_gaps_lock:
        if any_open:
            _no_open_gaps.pop(series, None)
        else:
            _no_open_gaps[series] = time.monotonic()


def _ts(row: Any) -> int | None:
    try:
        return int(row[0])
    except (TypeError, ValueError, IndexError):
        return None


def collect_job(
    job: Job,
    run: Run | None,
    heartbeat: Callable[[], Any],
    until_ms: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    max_pages: int | None = MAX_PAGES_PER_RUN,
    prefetch: int = 0,
) -> CollectResult:
    """Collect `job` up to its exchange's last closed candle (or `until_ms`, exclusive); see the module doc.

    Raises `CollectionFailed` with what was done and the error: `PermanentExchangeError` (the job cannot
    succeed as configured) or another exception (transient: retry later). Pages stored before an error
    stay stored and the cursor says so.
    `progress(slots, candles)` is called after each page; `stop`, once set, ends the run after the
    current page with `result.stopped`. After `max_pages` pages the run ends with `result.more`.
    `prefetch` (pages requested ahead, from as many helper threads) overlaps the requests with the
    writes: one asks each next page while the current one is written; more also guess the pages after
    it (see `_Fetcher`). Helpers use their own database connections, so the job's rows must be
    committed (backfill).
    """
    try:
        client = get_client(job.connector)
    except Exception as exc:
        raise CollectionFailed(CollectResult(), exc) from exc
    collection = _Collection(job, run, client, heartbeat, progress, stop, max_pages, prefetch)
    try:
        return _collect(job, collection, client, until_ms)
    except Exception as exc:
        # The result is final here: `_collect` recorded gaps, indicators and counters on its way out.
        raise CollectionFailed(collection.result, exc) from exc
    finally:
        collection.fetcher.close()


def _collect(job: Job, collection: _Collection, client: ExchangeClient, until_ms: int | None) -> CollectResult:
    from apps.marketdata import gaps as gaps_module

    step = collection.step
    series = collection.series

    # The exchange's clock, not ours, says which candles are closed: a candle is closed when
    # open + timeframe <= server time. Asked once per run; a run shorter than a candle cannot miss one.
    server_now = client.server_time_ms()
    end = server_now - step
    if until_ms is not None:
        end = min(end, until_ms - 1)

    if job.cursor is not None:
        start = job.cursor + step
    elif job.since is not None:
        start = datetime_to_ms(job.since)
    else:
        start = (end // step) * step - (get_config().collection.default_history_candles - 1) * step
    sync_from = start

    failed = True
    try:
        # History requested before what is stored (a backfill moved `since` back): fill the head first.
        stored_first = store.first_ts(*series) if job.cursor is not None and job.since is not None else None
        if stored_first is not None:
            since_ms = datetime_to_ms(job.since)
            if stored_first - since_ms >= step:  # at least one whole slot before the first stored candle
                sync_from = since_ms
                collection.page_range(since_ms, min(stored_first - 1, end), move_cursor=False)
                if not (collection.result.stopped or collection.result.more):
                    # The series is complete from its first stored candle on (earlier, the exchange has
                    # nothing: before the listing). Remember it so the head is not asked for every run.
                    first = store.first_ts(*series)
                    if first is not None:
                        Job.objects.filter(pk=job.pk).update(since=ms_to_datetime(first))
                        job.since = ms_to_datetime(first)

        if start <= end and not (collection.result.stopped or collection.result.more):
            collection.page_range(start, end, move_cursor=True)
        failed = False
    finally:
        # Even when the exchange failed half-way, what was stored gets its gaps recorded and indicators.
        result = collection.result
        if result.first_ts is not None and not collection.appended_only():
            first = store.first_ts(*series)
            last = store.last_ts(*series)
            if first is not None and last is not None:
                lower = max(first, min(sync_from, result.first_ts))
                if collection.skipped_from is not None:
                    lower = min(lower, collection.skipped_from)
                gaps_module.sync_gaps(*series, lower, last)
        refetched = not (failed or result.stopped or result.more)
        if refetched:
            collection.refetch_gaps(gaps_module)
        collection.update_indicators()
        collection.refresh_counters()
    # No open gap before the refetch and none recorded since: none now, without asking again.
    known_none = refetched and not collection.had_open_gaps and (result.first_ts is None or collection.appended_only())
    result.gaps_open = 0 if known_none else len(gaps_module.gaps_to_refetch(*series))
    result.complete = job.cursor is not None and job.cursor + step > end
    return result
