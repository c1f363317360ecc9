from datetime import datetime

from django import forms
from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone

from apps.marketdata import charts, store
from apps.marketdata.coverage import StatisticsList, coverage_rows
from apps.marketdata.models import Anomaly, Gap
from apps.marketdata.timeframes import is_valid_timeframe, ms_to_datetime, timeframe_error

# No Candle admin on purpose: the changelist counts the table on every page and offers to order and
# filter by unindexed columns, which on millions of rows is a denial of service. The series overview
# below (one grouped pass over the unique index, on demand) is the operator's view of the candles.


class SeriesChartForm(forms.Form):
    exchange_id = forms.CharField(max_length=64)
    symbol = forms.CharField(max_length=64)
    timeframe = forms.CharField(max_length=8)
    candles = forms.IntegerField(
        min_value=charts.MIN_CANDLES,
        max_value=charts.MAX_CANDLES,
        required=False,
        help_text=f"How many of the newest slots to draw ({charts.MIN_CANDLES} to {charts.MAX_CANDLES}).",
    )

    def clean_timeframe(self) -> str:
        timeframe = self.cleaned_data["timeframe"]
        if not is_valid_timeframe(timeframe):
            raise forms.ValidationError(timeframe_error(timeframe))
        return timeframe

    def clean_candles(self) -> int:
        return self.cleaned_data["candles"] or 300


SERIES_PER_PAGE = 500


def _time(ts: int | None) -> datetime | None:
    return None if ts is None else ms_to_datetime(ts)


@admin.register(Gap)
class GapAdmin(admin.ModelAdmin):
    list_display = [
        "exchange_id",
        "symbol",
        "timeframe",
        "first_missing",
        "last_missing",
        "missing",
        "status",
        "attempts",
        "updated_at",
    ]
    list_filter = ["status", "exchange_id", "timeframe"]
    search_fields = ["symbol"]
    readonly_fields = [
        "exchange_id",
        "symbol",
        "timeframe",
        "start_ts",
        "end_ts",
        "first_missing",
        "last_missing",
        "missing",
        "detected_at",
        "updated_at",
    ]
    fields = [*readonly_fields[:8], "status", "attempts", "detected_at", "updated_at"]
    actions = ["refetch"]
    change_list_template = "admin/marketdata/gap/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Gaps are found by comparing the store with the timeframe's slots, not typed in.
        return False

    @admin.display(description="First missing (UTC)", ordering="start_ts")
    def first_missing(self, gap: Gap) -> datetime | None:
        return _time(gap.start_ts)

    @admin.display(description="Last missing (UTC)", ordering="end_ts")
    def last_missing(self, gap: Gap) -> datetime | None:
        return _time(gap.end_ts)

    @admin.action(description="Refetch: reopen the selected gaps and reset their attempts")
    def refetch(self, request: HttpRequest, queryset: QuerySet[Gap]) -> None:
        reopened = queryset.reopen()
        self.message_user(
            request, f"{reopened} gap(s) reopened; the jobs refetch them on their next runs.", messages.SUCCESS
        )

    def get_urls(self) -> list[URLPattern]:
        overview = path("series/", self.admin_site.admin_view(self.series_overview), name="marketdata_series_overview")
        chart = path("series/chart/", self.admin_site.admin_view(self.series_chart), name="marketdata_series_chart")
        return [overview, chart, *super().get_urls()]

    def series_chart(self, request: HttpRequest) -> TemplateResponse:
        """Candles, volume, indicator overlays and RSI of the newest slots of one series."""
        form = SeriesChartForm(request.GET)
        chart = None
        if form.is_valid():
            chart = charts.build_chart(
                form.cleaned_data["exchange_id"],
                form.cleaned_data["symbol"],
                form.cleaned_data["timeframe"],
                form.cleaned_data["candles"],
            )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Chart",
            "form": form,
            "chart": chart,
            "sizes": (100, 300, 1000, charts.MAX_CANDLES),
        }
        return TemplateResponse(request, "admin/marketdata/series_chart.html", context)

    def series_overview(self, request: HttpRequest) -> TemplateResponse:
        """Every stored series with its coverage, from the store's per-series statistics (as the coverage
        API): no candle is counted, so the page costs the same with millions of them."""
        page = Paginator(StatisticsList(), SERIES_PER_PAGE).get_page(request.GET.get("page"))
        rows = [
            {
                **row,
                "first": _time(row["first_ts"]),
                "last": _time(row["last_ts"]),
                "complete": f"{100 * row['completeness']:.2f}%",
            }
            for row in coverage_rows(list(page.object_list), timezone.now())
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Stored series",
            "rows": rows,
            "page": page,
            "backend": store.backend_name(),
        }
        return TemplateResponse(request, "admin/marketdata/series_overview.html", context)


@admin.register(Anomaly)
class AnomalyAdmin(admin.ModelAdmin):
    """Candles stored as the exchange sent them that break an OHLC invariant (read-only: the store keeps
    them in step with the candles)."""

    list_display = ["exchange_id", "symbol", "timeframe", "time", "kind", "open", "high", "low", "close", "detected_at"]
    list_filter = ["kind", "exchange_id", "timeframe"]
    search_fields = ["symbol"]
    readonly_fields = [f.name for f in Anomaly._meta.fields] + ["time"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Anomaly | None = None) -> bool:
        return False

    @admin.display(description="Candle open (UTC)", ordering="ts")
    def time(self, anomaly: Anomaly) -> datetime | None:
        return _time(anomaly.ts)
