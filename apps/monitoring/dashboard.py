"""The operator's dashboard on the admin index (`templates/admin/index.html`): the fleet at a glance.

The first paint comes from a handful of cheap queries here (indexed filters, small aggregates, at most a
few rows each, and one pass over the jobs table's id/status/cursor); the page then keeps itself current
over the hub (`static/monitoring/dashboard.js`, channels `jobs`, `ratelimits`, `gaps`).
"""

from datetime import timedelta
from typing import Any

from django.db.models import Count, Q, Sum
from django.utils import timezone

from apps.jobs.models import Job, Run
from apps.marketdata.models import Gap
from apps.marketdata.timeframes import ms_to_datetime, slot_after
from apps.monitoring import live
from apps.ratelimits.models import RateLimit, Rejection

# A job is overdue when its run is this late and no worker holds it.
OVERDUE_AFTER = timedelta(minutes=2)
# The 429/418 answers an exchange's row counts on first paint (live ones are added as they come).
REJECTIONS_SINCE = timedelta(hours=1)
LIST_LENGTH = 10


def fleet_summary() -> dict[str, Any]:
    now = timezone.now()
    by_status = {row["status"]: row["n"] for row in Job.objects.values("status").annotate(n=Count("pk"))}
    unleased = Q(lease_owner="") | Q(lease_expires_at__lt=now)
    overdue = (
        Job.objects.filter(status=Job.Status.ACTIVE, next_run_at__lt=now - OVERDUE_AFTER)
        .filter(unleased)
        .select_related("connector")
        .order_by("next_run_at")
    )
    failing = (
        Job.objects.filter(Q(status=Job.Status.ERROR) | Q(consecutive_failures__gt=0))
        .select_related("connector")
        .order_by("-consecutive_failures", "-updated_at")
    )
    in_flight = Run.objects.filter(status=Run.Status.RUNNING).select_related("job__connector").order_by("started_at")
    gaps = Gap.objects.filter(status=Gap.Status.OPEN)
    open_gaps = gaps.aggregate(count=Count("pk"), missing=Sum("missing", default=0))
    gaps_by_series = [
        row
        for row in gaps.values("exchange_id", "symbol", "timeframe")
        .annotate(count=Count("pk"), missing=Sum("missing"))
        .order_by("-missing")[:LIST_LENGTH]
    ]
    series = _series_freshness(now)
    rejected = dict(
        Rejection.objects.since(now - REJECTIONS_SINCE)
        .values_list("exchange_id")
        .annotate(n=Count("pk"))
        .order_by()
        .values_list("exchange_id", "n")
    )
    return {
        "statuses": [(value, label, by_status.get(value, 0)) for value, label in Job.Status.choices],
        "job_total": sum(by_status.values()),
        "overdue": list(overdue[:LIST_LENGTH]),
        "overdue_count": overdue.count(),
        "failing": list(failing[:LIST_LENGTH]),
        "failing_count": failing.count(),
        "in_flight": list(in_flight[: LIST_LENGTH * 2]),
        "in_flight_count": in_flight.count(),
        "ratelimits": [
            {**live.ratelimit_payload(row), "rejected_last_hour": rejected.get(row.exchange_id, 0)}
            for row in RateLimit.objects.order_by("exchange_id")
        ],
        "open_gaps": open_gaps,
        "gaps_by_series": gaps_by_series,
        "freshest": series[:5],
        "stalest": series[::-1][:5],
        # For the page's script: each job's status and cursor, so live messages update the counts exactly.
        "live_state": {
            "jobs": {str(s["id"]): s["status"] for s in series},
            "gaps": {f"{r['exchange_id']}|{r['symbol']}|{r['timeframe']}": r["count"] for r in gaps_by_series},
            "overdue_after_seconds": OVERDUE_AFTER.total_seconds(),
        },
    }


def _series_freshness(now) -> list[dict[str, Any]]:
    """Every job's series with the age of its newest stored candle's close, freshest first."""
    rows = []
    for job_id, exchange_id, symbol, timeframe, cursor, status in Job.objects.values_list(
        "id", "connector__exchange_id", "symbol", "timeframe", "cursor", "status"
    ):
        age = None
        if cursor is not None:
            closed = ms_to_datetime(slot_after(timeframe, cursor))
            age = max(0.0, (now - closed).total_seconds())
        rows.append(
            {
                "id": job_id,
                "exchange_id": exchange_id,
                "symbol": symbol,
                "timeframe": timeframe,
                "status": status,
                "last_candle": None if cursor is None else ms_to_datetime(cursor),
                "age_seconds": age,
            }
        )
    # Series with nothing stored are the stalest of all.
    rows.sort(key=lambda row: float("inf") if row["age_seconds"] is None else row["age_seconds"])
    return rows
