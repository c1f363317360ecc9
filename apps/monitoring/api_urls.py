"""The system API under /api/v1/system/ (the health probes and /metrics are in urls.py, outside the API)."""

from django.urls import re_path

from apps.monitoring import views

urlpatterns = [
    re_path(r"^system/status/?$", views.SystemStatusView.as_view(), name="system-status"),
    re_path(r"^system/stats/?$", views.SystemStatsView.as_view(), name="system-stats"),
    re_path(r"^system/jobs/?$", views.SystemJobsView.as_view(), name="system-jobs"),
]
