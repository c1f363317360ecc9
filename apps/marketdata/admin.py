from datetime import datetime

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet, Sum
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from apps.marketdata import charts, store
from apps.marketdata.models import Gap
from apps.marketdata.timeframes import is_valid_timeframe, ms_to_datetime, slot_count, timeframe_error

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
        """Every stored series with its coverage and gap totals (one pass over the candle index)."""
        gap_totals = {
            (row["exchange_id"], row["symbol"], row["timeframe"]): row
            for row in Gap.objects.values("exchange_id", "symbol", "timeframe").annotate(
                open_gaps=Count("pk", filter=Q(status=Gap.Status.OPEN)),
                open_missing=Sum("missing", filter=Q(status=Gap.Status.OPEN), default=0),
                confirmed_missing=Sum("missing", filter=Q(status=Gap.Status.CONFIRMED_EMPTY), default=0),
            )
        }
        rows = []
        for series in store.list_series_coverage():
            key = (series.exchange_id, series.symbol, series.timeframe)
            expected = slot_count(series.timeframe, series.first_ts, series.last_ts)
            rows.append(
                {
                    "series": series,
                    "first": _time(series.first_ts),
                    "last": _time(series.last_ts),
                    "expected": expected,
                    "complete": f"{100 * series.count / expected:.2f}%" if expected else "",
                    "gaps": gap_totals.get(key, {}),
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Stored series",
            "rows": rows,
            "backend": store.backend_name(),
        }
        return TemplateResponse(request, "admin/marketdata/series_overview.html", context)
