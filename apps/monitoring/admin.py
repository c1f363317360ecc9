from django.contrib import admin
from django.http import HttpRequest

from apps.monitoring.models import SchedulerProcess


@admin.register(SchedulerProcess)
class SchedulerProcessAdmin(admin.ModelAdmin):
    """The fleet: every run_scheduler process that registered, read-only (the processes write it)."""

    list_display = [
        "worker_id",
        "state",
        "host",
        "pid",
        "workers",
        "version",
        "started_at",
        "last_heartbeat",
        "stopped_at",
    ]
    list_filter = ["host", "version"]
    search_fields = ["worker_id", "host"]
    date_hierarchy = "started_at"

    @admin.display(description="State")
    def state(self, process: SchedulerProcess) -> str:
        return process.state

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SchedulerProcess | None = None) -> bool:
        return False
