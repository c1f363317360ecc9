"""What the status API reports: one exchange's health, the whole system's, its counts over the last hour and
day, and the runs in flight. Each is a handful of indexed queries over shared state (the rate-limit rows,
runs, the fleet registry, the series statistics), so any web instance answers for the whole fleet.
"""

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Q, Sum
from django.utils import timezone

from apps.jobs.models import Job, Run
from apps.marketdata import store
from apps.monitoring.metrics import OVERDUE_AFTER
from apps.monitoring.models import SchedulerProcess
from apps.ratelimits.models import RateLimit, Rejection
from apps.ratelimits.serializers import available_tokens, circuit_state
from datacollector.config import get_config
from datacollector.version import version

WINDOWS = {"last_hour": timedelta(hours=1), "last_day": timedelta(days=1)}


def _bucket(row: RateLimit, now: datetime) -> dict[str, Any]:
    return {
        "tokens_available": round(available_tokens(row, now), 3),
        "capacity": row.limit,  # what a window may spend, in window mode
        "weight_per_minute": row.effective_weight_per_minute,
        "configured_weight_per_minute": row.configured_weight_per_minute,
        "announced_weight_per_minute": row.announced_weight_per_minute,
        "capped": row.capped,
        "window_seconds": row.window_seconds,
    }


def _backing_off(row: RateLimit, now: datetime) -> bool:
    return row.blocked_until is not None and row.blocked_until > now


def exchange_status(exchange_id: str, now: datetime | None = None) -> dict[str, Any]:
    """The exchange's shared bucket, back-off and circuit, its last successful and failed runs, and the
    rate-limit answers (429/418) it sent in the last hour. `state` sums it up: ok, backing_off, circuit_open,
    circuit_half_open, or idle (no request made yet)."""
    now = now or timezone.now()
    row = RateLimit.objects.filter(exchange_id=exchange_id).first()
    runs = Run.objects.filter(job__connector__exchange_id=exchange_id).order_by("-started_at")
    success = runs.filter(status=Run.Status.SUCCESS).values("finished_at").first()
    failure = runs.filter(status=Run.Status.FAILED).values("finished_at", "error").first()
    circuit = circuit_state(row, now) if row is not None else "closed"
    if row is None:
        state = "idle"
    elif _backing_off(row, now):
        state = "backing_off"
    elif circuit != "closed":
        state = f"circuit_{circuit.replace('-', '_')}"
    else:
        state = "ok"
    return {
        "exchange_id": exchange_id,
        "state": state,
        "bucket": _bucket(row, now) if row is not None else None,
        "backing_off": row is not None and _backing_off(row, now),
        "blocked_until": row.blocked_until if row is not None else None,
        "circuit": circuit,
        "circuit_failures": row.circuit_failures if row is not None else 0,
        "circuit_open_until": row.circuit_open_until if row is not None else None,
        "last_success_at": success["finished_at"] if success else None,
        "last_failure_at": failure["finished_at"] if failure else None,
        "last_failure_error": failure["error"] if failure else "",
        "rate_limited_last_hour": Rejection.objects.filter(exchange_id=exchange_id)
        .since(now - WINDOWS["last_hour"])
        .count(),
    }


def system_status(checks: dict[str, dict[str, str]], now: datetime | None = None) -> dict[str, Any]:
    """Version, the components' `checks` (/health/ready's), the fleet, jobs overdue, runs in flight and the
    exchanges backing off. `ok` is False when a component fails (then the API answers 503, as /health/ready
    does); `degraded` lists what is wrong while the components answer (no scheduler alive, exchanges backing
    off), which a readiness probe must not act on: restarting the web would not help."""
    now = now or timezone.now()
    failing = [name for name, check in checks.items() if check["status"] != "ok"]
    body: dict[str, Any] = {"version": version(), "checks": checks, "candle_store": store.backend_name()}
    if "database" in failing:
        return {**body, "ok": False, "failing": failing, "degraded": []}
    fleet = SchedulerProcess.objects.running().aggregate(
        alive=Count("id", filter=Q(last_heartbeat__gte=now - _lost_after())),
        lost=Count("id", filter=Q(last_heartbeat__lt=now - _lost_after())),
        workers=Sum("workers", filter=Q(last_heartbeat__gte=now - _lost_after())),
    )
    limits = RateLimit.objects.filter(Q(blocked_until__gt=now) | Q(circuit_open_until__isnull=False))
    backing_off = sorted(
        row.exchange_id for row in limits if _backing_off(row, now) or circuit_state(row, now) != "closed"
    )
    degraded = [name for name, bad in (("schedulers", fleet["alive"] == 0), ("exchanges", bool(backing_off))) if bad]
    return {
        **body,
        "ok": not failing,
        "failing": failing,
        "degraded": degraded,
        "schedulers": {"alive": fleet["alive"], "lost": fleet["lost"], "workers": fleet["workers"] or 0},
        "jobs_overdue": Job.objects.filter(status=Job.Status.ACTIVE, next_run_at__lt=now - OVERDUE_AFTER).count(),
        "runs_in_flight": Run.objects.filter(status=Run.Status.RUNNING).count(),
        "exchanges_backing_off": backing_off,
    }


def _lost_after() -> timedelta:
    return timedelta(seconds=get_config().scheduler.lost_after_seconds)


def system_stats(now: datetime | None = None) -> dict[str, Any]:
    """Candles and series stored (the store's per-series statistics), then for the last hour and day:
    requests sent, rate-limit answers (429/418), and runs by outcome (runs by their start)."""
    now = now or timezone.now()
    series = store.series_statistics()
    body: dict[str, Any] = {"series": len(series), "candles": sum(s.candles for s in series)}
    for name, span in WINDOWS.items():
        since = now - span
        runs = Run.objects.filter(started_at__gte=since).aggregate(
            requests=Sum("requests"),
            candles_written=Sum("candles_written"),
            **{status: Count("id", filter=Q(status=status)) for status in Run.Status.values},
        )
        body[name] = {
            "requests": runs.pop("requests") or 0,
            "candles_written": runs.pop("candles_written") or 0,
            "rate_limited": Rejection.objects.since(since).count(),
            "runs": runs,
        }
    return body


def runs_in_flight(now: datetime | None = None) -> list[dict[str, Any]]:
    """The running runs, oldest first: worker, series, pages and candles so far (saved every few seconds
    while a run goes), age."""
    now = now or timezone.now()
    rows = Run.objects.filter(status=Run.Status.RUNNING).select_related("job__connector").order_by("started_at")
    return [
        {
            "run": run.pk,
            "job": run.job_id,
            "worker": run.worker,
            "exchange_id": run.job.connector.exchange_id,
            "symbol": run.job.symbol,
            "timeframe": run.job.timeframe,
            "started_at": run.started_at,
            "age_seconds": round((now - run.started_at).total_seconds(), 3),
            "pages": run.requests,
            "candles_fetched": run.candles_fetched,
            "candles_written": run.candles_written,
            "lease_expires_at": run.job.lease_expires_at,
        }
        for run in rows
    ]
