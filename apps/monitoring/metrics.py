"""Fleet-wide metrics read from the shared database at scrape time, exported on the web's /metrics.

Scheduler processes count what they do themselves (`run_scheduler --metrics-port`); what every
process shares (job states, the token buckets, circuits, gaps) lives in the database, so any web
instance can report it for the whole fleet. Labels stay low-cardinality: per exchange, never per job.
"""

from collections.abc import Iterator
from datetime import timedelta

from django.db import DatabaseError
from django.db.models import Count, Min, Q, Sum
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# An active job whose next run is this late means the schedulers are not keeping up (or none runs).
OVERDUE_AFTER = timedelta(minutes=5)


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
        yield from (running, oldest)

        labels = ["exchange"]
        granted = CounterMetricFamily("dc_bucket_granted", "Token requests granted, all processes.", labels=labels)
        denied = CounterMetricFamily("dc_bucket_denied", "Token requests told to wait, all processes.", labels=labels)
        used = CounterMetricFamily("dc_bucket_tokens_used", "Request weight taken, all processes.", labels=labels)
        waited = CounterMetricFamily("dc_bucket_wait_seconds", "Seconds spent waiting for tokens.", labels=labels)
        tokens = GaugeMetricFamily("dc_bucket_tokens", "Tokens in the bucket at its last update.", labels=labels)
        capacity = GaugeMetricFamily("dc_bucket_capacity", "Bucket capacity (burst).", labels=labels)
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
            blocked.add_metric(key, int(bool(limit.blocked_until and limit.blocked_until > now)))
            circuit.add_metric(key, int(bool(limit.circuit_open_until and limit.circuit_open_until > now)))
        yield from (granted, denied, used, waited, tokens, capacity, blocked, circuit)

        gaps = GaugeMetricFamily(
            "dc_gaps", "Missing candle ranges by exchange and status.", labels=["exchange", "status"]
        )
        missing = GaugeMetricFamily("dc_gap_missing_candles", "Missing candles in open gaps.", labels=["exchange"])
        for row in Gap.objects.values("exchange_id", "status").annotate(n=Count("id"), m=Sum("missing")).order_by():
            gaps.add_metric([row["exchange_id"], row["status"]], row["n"])
            if row["status"] == Gap.Status.OPEN:
                missing.add_metric([row["exchange_id"]], row["m"] or 0)
        yield from (gaps, missing)


_registered = False


def register() -> None:
    """Add the fleet collector to the default registry once per process (ready() may run twice)."""
    global _registered
    if not _registered:
        REGISTRY.register(FleetCollector())
        _registered = True
