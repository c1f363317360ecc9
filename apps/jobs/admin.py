from datetime import datetime

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.text import Truncator

from apps.jobs.models import Job, Run
from apps.marketdata.timeframes import ms_to_datetime

RECENT_RUNS = 20


class RecentRunsFormSet(BaseInlineFormSet):
    def get_queryset(self) -> QuerySet:
        # Newest first and bounded: a job that runs every minute has thousands of runs.
        return super().get_queryset().order_by("-started_at")[:RECENT_RUNS]


class RecentRunInline(admin.TabularInline):
    model = Run
    formset = RecentRunsFormSet
    fields = [
        "started_at",
        "status",
        "worker",
        "duration",
        "candles_fetched",
        "candles_written",
        "requests",
        "rate_limit_wait",
        "error",
    ]
    readonly_fields = fields
    extra = 0
    show_change_link = True
    verbose_name_plural = f"Recent runs (newest {RECENT_RUNS}; “All runs” above has the rest)"

    def has_add_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False


def cursor_time(job: Job) -> datetime | None:
    return None if job.cursor is None else ms_to_datetime(job.cursor)


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "exchange",
        "symbol",
        "timeframe",
        "status",
        "collected_until",
        "next_run_at",
        "last_success_at",
        "consecutive_failures",
        "lease_owner",
        "short_error",
    ]
    list_filter = ["status", "connector", "timeframe"]
    search_fields = ["symbol", "connector__exchange_id", "last_error"]
    list_select_related = ["connector"]
    date_hierarchy = "created_at"
    actions = ["pause_jobs", "resume_jobs", "run_jobs_now"]
    inlines = [RecentRunInline]
    state_fields = [
        "collected_until",
        "cursor",
        "next_run_at",
        "lease_owner",
        "lease_expires_at",
        "last_run_at",
        "last_success_at",
        "consecutive_failures",
        "last_error",
        "runs_link",
        "created_at",
        "updated_at",
    ]
    fieldsets = [
        (None, {"fields": ["connector", "symbol", "timeframe", "status", "since"]}),
        ("State (kept by the scheduler)", {"fields": state_fields}),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Job | None = None) -> list[str]:
        # The cursor and the stored candles belong to the series: it is fixed once created.
        series = ["connector", "symbol", "timeframe"] if obj is not None else []
        return [*series, *self.state_fields]

    def get_fieldsets(self, request: HttpRequest, obj: Job | None = None) -> list:
        return self.fieldsets if obj is not None else self.fieldsets[:1]

    def save_model(self, request: HttpRequest, obj: Job, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        # Setting the status by hand means what the actions mean: resuming clears the error state and
        # makes the job due, just as the Resume action and the API do.
        if change and "status" in form.changed_data:
            if obj.status == Job.Status.ACTIVE:
                obj.resume()
            elif obj.status == Job.Status.PAUSED:
                obj.pause()

    @admin.display(description="Exchange", ordering="connector__exchange_id")
    def exchange(self, job: Job) -> str:
        return job.connector.exchange_id

    @admin.display(description="Collected until (last candle)", ordering="cursor")
    def collected_until(self, job: Job) -> datetime | None:
        return cursor_time(job)

    @admin.display(description="Last error")
    def short_error(self, job: Job) -> str:
        return Truncator(job.last_error).chars(80)

    @admin.display(description="Runs")
    def runs_link(self, job: Job) -> str:
        url = reverse("admin:jobs_run_changelist") + f"?job__id__exact={job.pk}"
        return format_html('<a href="{}">All runs of this job</a>', url)

    @admin.action(description="Pause")
    def pause_jobs(self, request: HttpRequest, queryset: QuerySet) -> None:
        self.message_user(request, f"Paused {queryset.pause()} job(s).", messages.SUCCESS)

    @admin.action(description="Resume (clear errors)")
    def resume_jobs(self, request: HttpRequest, queryset: QuerySet) -> None:
        self.message_user(request, f"Resumed {queryset.resume()} job(s).", messages.SUCCESS)

    @admin.action(description="Run now")
    def run_jobs_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        self.message_user(request, f"{queryset.run_now()} job(s) will run at once.", messages.SUCCESS)


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """Written by the collector only: operators look, never edit."""

    list_display = [
        "job",
        "status",
        "worker",
        "started_at",
        "finished_at",
        "duration",
        "candles_fetched",
        "candles_written",
        "requests",
        "rate_limit_wait",
        "short_error",
    ]
    list_filter = ["status", "job__connector", "job__timeframe", "started_at"]
    search_fields = ["job__symbol", "job__connector__exchange_id", "worker", "error"]
    list_select_related = ["job__connector"]
    date_hierarchy = "started_at"

    @admin.display(description="Error")
    def short_error(self, run: Run) -> str:
        return Truncator(run.error).chars(80)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Run | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Run | None = None) -> bool:
        return False
