from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from apps.connectors.exchanges import ExchangeError
from apps.connectors.models import REFRESH_PATIENCE_SECONDS, Connector
from apps.jobs.models import Job, Task

# Rows shown inline on a connector's page; the job list (linked) has them all.
INLINE_JOBS = 50


class NewestJobsFormSet(BaseInlineFormSet):
    def get_queryset(self) -> QuerySet:
        # Slicing after the inline formset's own filter keeps a big connector's page small.
        return super().get_queryset().order_by("symbol", "timeframe")[:INLINE_JOBS]


class JobInline(admin.TabularInline):
    model = Job
    formset = NewestJobsFormSet
    fields = ["symbol", "timeframe", "status", "next_run_at", "last_success_at", "consecutive_failures", "last_error"]
    readonly_fields = fields
    extra = 0
    show_change_link = True
    verbose_name_plural = f"Jobs (first {INLINE_JOBS}; use “Jobs” above for all)"

    def has_add_permission(self, request: HttpRequest, obj: Connector | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Connector | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Connector | None = None) -> bool:
        return False


class ConnectorForm(forms.ModelForm):
    # The user editing; ConnectorAdmin.get_form sets it for each request (options.urls needs a permission).
    user: Any = None

    def clean_options(self) -> object:
        options = self.cleaned_data.get("options")
        # self.instance still holds the stored options here: the form copies its data onto it later.
        error = self.instance.urls_permission_error(self.user, options)
        if error is not None:
            raise forms.ValidationError(error)
        return options


@admin.register(Connector)
class ConnectorAdmin(admin.ModelAdmin):
    form = ConnectorForm
    list_display = [
        "exchange_id",
        "name",
        "enabled",
        "jobs_link",
        "active_jobs",
        "rate_limit_weight_per_minute",
        "rate_limit_burst",
        "updated_at",
    ]
    list_filter = ["enabled"]
    search_fields = ["exchange_id", "name"]
    actions = ["start_connectors", "stop_connectors", "refresh_markets"]
    inlines = [JobInline]
    fieldsets = [
        (None, {"fields": ["exchange_id", "name", "enabled", "jobs_link"]}),
        ("ccxt", {"fields": ["options"]}),
        (
            "Rate limit (empty: the collector.yaml default)",
            {"fields": ["rate_limit_weight_per_minute", "rate_limit_burst"]},
        ),
        ("Retention (empty: collector.yaml's period per timeframe)", {"fields": ["retention_days"]}),
        (
            "Credentials: names of environment variables, never the keys",
            {"fields": ["api_key_env", "api_secret_env", "api_password_env"]},
        ),
        (None, {"fields": ["created_at", "updated_at"]}),
    ]

    def save_model(self, request: HttpRequest, obj: Connector, form: forms.ModelForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            # Fetched by a scheduler worker: the exchange may be slow or far, the admin page does not wait.
            Task.objects.enqueue(Task.Kind.MARKETS, {"connector": obj.pk}, request.user)

    def get_form(self, request: HttpRequest, obj: Connector | None = None, change: bool = False, **kwargs) -> type:
        form = super().get_form(request, obj, change=change, **kwargs)
        # modelform_factory builds a new class on every call, so this attribute is this request's alone.
        form.user = request.user
        return form

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return (
            super()
            .get_queryset(request)
            .annotate(job_count=Count("jobs"), active_count=Count("jobs", filter=Q(jobs__status=Job.Status.ACTIVE)))
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Connector | None = None) -> list[str]:
        # Candles and rate-limit buckets are keyed by the exchange id: it is fixed once created.
        fixed = ["exchange_id"] if obj is not None else []
        return [*fixed, "jobs_link", "created_at", "updated_at"]

    @admin.display(description="Jobs", ordering="job_count")
    def jobs_link(self, connector: Connector) -> str:
        if connector.pk is None:
            return "—"
        jobs = reverse("admin:jobs_job_changelist") + f"?connector__id__exact={connector.pk}"
        add = reverse("admin:jobs_job_add") + f"?connector={connector.pk}"
        count = getattr(connector, "job_count", None)
        count = connector.jobs.count() if count is None else count
        return format_html('<a href="{}">{} jobs</a> · <a href="{}">add a job</a>', jobs, count, add)

    @admin.display(description="Active", ordering="active_count")
    def active_jobs(self, connector: Connector) -> int:
        return connector.active_count

    @admin.action(description="Start: enable and activate all their jobs")
    def start_connectors(self, request: HttpRequest, queryset: QuerySet) -> None:
        jobs = sum(connector.start() for connector in queryset)
        self.message_user(request, f"Started {len(queryset)} connector(s); {jobs} job(s) active.", messages.SUCCESS)

    @admin.action(description="Stop: pause all their jobs")
    def stop_connectors(self, request: HttpRequest, queryset: QuerySet) -> None:
        jobs = sum(connector.stop() for connector in queryset)
        self.message_user(request, f"Stopped {len(queryset)} connector(s); {jobs} job(s) paused.", messages.SUCCESS)

    @admin.action(description="Refresh markets from the exchange (now, one request each)")
    def refresh_markets(self, request: HttpRequest, queryset: QuerySet) -> None:
        for connector in queryset:
            try:
                result = connector.refresh_markets(patience_seconds=REFRESH_PATIENCE_SECONDS)
            except ExchangeError as exc:
                self.message_user(request, f"{connector.exchange_id}: markets not refreshed: {exc}", messages.ERROR)
                continue
            self.message_user(
                request,
                f"{connector.exchange_id}: {result.total} markets; {result.added} added, {result.updated} updated, "
                f"{result.delisted} delisted, {result.relisted} listed again; {result.jobs_stopped} job(s) stopped.",
                messages.SUCCESS,
            )
