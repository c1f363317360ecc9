"""The metrics of ARCHITECTURE's section 8.1 (`data_collector_*`) and the project's own (`dc_*`).

Two kinds. Fleet-wide state read from the shared database at scrape time (`FleetCollector`: job states,
due jobs, the token buckets, circuits, gaps, connectors) is exported by the web's /metrics only: every
process shares it, so one web instance reports it for the whole fleet. What a process does (candles
stored, requests and their duration, waits for the shared budget, gaps found, 429s) is counted where it
happens, in the process doing it, and a scheduler serves its own counts (`run_scheduler --metrics-port`).

Labels stay bounded: per exchange (the exchanges ccxt knows), and per series (exchange, pair,
timeframe) only for the first METRICS_SERIES_LIMIT series a process sees; later ones are counted under
pair="other", timeframe="other" (see `series_labels`).
"""

import threading
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count, Min, Q, Sum
from django.utils import timezone
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# An active job whose next run is this late means the schedulers are not keeping up (or none runs).
OVERDUE_AFTER = timedelta(minutes=5)

SERIES = ["exchange", "pair", "timeframe"]
CANDLES = Counter(
    "data_collector_candles_total", "Candles stored by this process (new or revised), per series.", SERIES
)
GAPS_DETECTED = Counter(
    "data_collector_gaps_detected_total", "Missing candle ranges this process found, per series.", SERIES
)
FETCH_SECONDS = Histogram(
    "data_collector_fetch_duration_seconds",
    "Duration of one request to an exchange (answered or failed), this process.",
    ["exchange"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RATE_LIMIT_WAITS = Counter(
    "data_collector_rate_limit_waits_total",
    "Times a request of this process was told to wait by the shared rate limit (one per sleep).",
    ["exchange"],
)
RATE_LIMITED = Counter(
    "data_collector_rate_limited_responses_total",
    "429/418 answers (rate limited or banned) an exchange gave this process.",
    ["exchange"],
)

# Label value of the series counted past METRICS_SERIES_LIMIT.
OTHER = "other"


class SeriesLabels:
    """The (exchange, pair, timeframe) label values of a series, for at most `limit` distinct series.

    Each series is a time series per metric in Prometheus. With 10,000 collected series, per-series
    labels would make 10,000 series per metric in each process that touched them all; past the limit a
    process counts new series under (exchange, "other", "other") instead, so its metrics hold at most
    `limit` + one per exchange series each, and the totals per exchange stay exact.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, exchange: str, pair: str, timeframe: str) -> tuple[str, str, str]:
        key = (exchange, pair, timeframe)
        limit = settings.METRICS_SERIES_LIMIT if self.limit is None else self.limit
        with self._lock:
            if key in self._seen:
                return key
            if len(self._seen) < limit:
                self._seen.add(key)
                return key
        return (exchange, OTHER, OTHER)


series_labels = SeriesLabels()


class FleetCollector(Collector):
    def describe(self) -> list[Metric]:
        # Without describe() the registry calls collect() at registration, i.e. queries the
        # database at every process start, before migrations have even run.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            # Read everything before yielding anything, so a failure halfway cannot emit a family twice.
            metrics = list(self._collect())
        except DatabaseError:
            # A scrape must not fail because the database blinked; `dc_database_up` says what happened.
            up = GaugeMetricFamily("dc_database_up", "Whether the fleet metrics could be read.")
            up.add_metric([], 0)
            metrics = [up]
        yield from metrics

    def _collect(self) -> Iterator[Metric]:
        from apps.connectors.models import Connector
        from apps.jobs.models import Job, Run
        from apps.marketdata.models import Gap
        from apps.ratelimits.models import RateLimit

        now = timezone.now()
        up = GaugeMetricFamily("dc_database_up", "Whether the fleet metrics could be read.")
        up.add_metric([], 1)
        yield up

        jobs = GaugeMetricFamily("dc_jobs", "Collection jobs by exchange and status.", labels=["exchange", "status"])
        overdue = GaugeMetricFamily(
            "dc_jobs_overdue",
            f"Active jobs whose next run is more than {OVERDUE_AFTER.seconds // 60} minutes late.",
            labels=["exchange"],
        )
        failing = GaugeMetricFamily(
            "dc_jobs_failing", "Active jobs whose last run failed (retrying with backoff).", labels=["exchange"]
        )
        rows = (
            Job.objects.values("connector__exchange_id", "status")
            .annotate(
                n=Count("id"),
                overdue=Count("id", filter=Q(next_run_at__lt=now - OVERDUE_AFTER)),
                failing=Count("id", filter=Q(consecutive_failures__gt=0)),
            )
            .order_by()
        )
        for row in rows:
            exchange = row["connector__exchange_id"]
            jobs.add_metric([exchange, row["status"]], row["n"])
            if row["status"] == Job.Status.ACTIVE:
                overdue.add_metric([exchange], row["overdue"])
                failing.add_metric([exchange], row["failing"])
        yield from (jobs, overdue, failing)

        queue = GaugeMetricFamily(
            "data_collector_job_queue_size", "Jobs due now that no scheduler has claimed yet (all exchanges)."
        )
        queue.add_metric([], Job.objects.due(now).count())
        connectors = GaugeMetricFamily("data_collector_active_connectors", "Enabled connectors.")
        connectors.add_metric([], Connector.objects.filter(enabled=True).count())
        yield from (queue, connectors)

        running = GaugeMetricFamily(
            "dc_runs_running", "Runs in progress, and the age of the oldest one.", labels=["exchange"]
        )
        oldest = GaugeMetricFamily(
            "dc_runs_oldest_running_seconds", "Age of the oldest run still running.", labels=["exchange"]
        )
        for row in (
            Run.objects.filter(status=Run.Status.RUNNING)
            .values("job__connector__exchange_id")
            .annotate(n=Count("id"), first=Min("started_at"))
            .order_by()
        ):
            exchange = row["job__connector__exchange_id"]
            running.add_metric([exchange], row["n"])
            oldest.add_metric([exchange], (now - row["first"]).total_seconds())
        stalled = GaugeMetricFamily(
            "dc_runs_stalled",
            "Runs still running whose job's lease expired: their worker stopped renewing it (died or hung).",
            labels=["exchange"],
        )
        for row in (
            Run.objects.filter(status=Run.Status.RUNNING)
            .filter(Q(job__lease_expires_at__isnull=True) | Q(job__lease_expires_at__lt=now))
            .values("job__connector__exchange_id")
            .annotate(n=Count("id"))
            .order_by()
        ):
            stalled.add_metric([row["job__connector__exchange_id"]], row["n"])
        yield from (running, oldest, stalled)

        labels = ["exchange"]
        granted = CounterMetricFamily("dc_bucket_granted", "Token requests granted, all processes.", labels=labels)
        denied = CounterMetricFamily("dc_bucket_denied", "Token requests told to wait, all processes.", labels=labels)
        used = CounterMetricFamily("dc_bucket_tokens_used", "Request weight taken, all processes.", labels=labels)
        waited = CounterMetricFamily("dc_bucket_wait_seconds", "Seconds spent waiting for tokens.", labels=labels)
        tokens = GaugeMetricFamily("dc_bucket_tokens", "Tokens in the bucket at its last update.", labels=labels)
        capacity = GaugeMetricFamily("dc_bucket_capacity", "Bucket capacity (burst).", labels=labels)
        per_minute = GaugeMetricFamily(
            "dc_bucket_weight_per_minute", "Weight the bucket refills per minute (the sustained budget).", labels=labels
        )
        blocked = GaugeMetricFamily(
            "dc_exchange_blocked", "1 while the exchange asked us to back off (429/418).", labels=labels
        )
        circuit = GaugeMetricFamily("dc_circuit_open", "1 while the exchange's circuit breaker is open.", labels=labels)
        for limit in RateLimit.objects.all():
            key = [limit.exchange_id]
            granted.add_metric(key, limit.granted)
            denied.add_metric(key, limit.denied)
            used.add_metric(key, limit.tokens_used)
            waited.add_metric(key, limit.wait_seconds)
            tokens.add_metric(key, limit.tokens)
            capacity.add_metric(key, limit.capacity)
            per_minute.add_metric(key, limit.refill_per_second * 60)
            blocked.add_metric(key, int(bool(limit.blocked_until and limit.blocked_until > now)))
            circuit.add_metric(key, int(bool(limit.circuit_open_until and limit.circuit_open_until > now)))
        yield from (granted, denied, used, waited, tokens, capacity, per_minute, blocked, circuit)

        gaps = GaugeMetricFamily(
            "dc_gaps", "Missing candle ranges by exchange and status.", labels=["exchange", "status"]
        )
        missing = GaugeMetricFamily("dc_gap_missing_candles", "Missing candles in open gaps.", labels=["exchange"])
        for row in Gap.objects.values("exchange_id", "status").annotate(n=Count("id"), m=Sum("missing")).order_by():
            gaps.add_metric([row["exchange_id"], row["status"]], row["n"])
            if row["status"] == Gap.Status.OPEN:
                missing.add_metric([row["exchange_id"]], row["m"] or 0)
        yield from (gaps, missing)


_fleet: FleetCollector | None = None


def register() -> None:
    """Add the fleet collector to the default registry once per process (ready() may run twice)."""
    global _fleet
    if _fleet is None:
        _fleet = FleetCollector()
        REGISTRY.register(_fleet)


def unregister() -> None:
    """Leave fleet-wide state to the web: a scheduler serving its metrics exports only its own counts
    (otherwise every scheduler would repeat the fleet's numbers and query the database per scrape)."""
    global _fleet
    if _fleet is not None:
        REGISTRY.unregister(_fleet)
        _fleet = None
