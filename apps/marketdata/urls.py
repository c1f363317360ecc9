from django.urls import path, re_path
from rest_framework.routers import SimpleRouter

from apps.marketdata import views

# Taken over by the project's API router (datacollector/urls.py), like the other apps' routers.
router = SimpleRouter()
router.register("data/gaps", views.GapViewSet)
router.register("data/anomalies", views.AnomalyViewSet)

urlpatterns = [
    path("data/ohlcv", views.ohlcv, name="data-ohlcv"),
    path("data/indicators", views.indicators, name="data-indicators"),
    re_path(r"^indicators/?$", views.IndicatorListView.as_view(), name="indicator-list"),
    re_path(r"^indicators/config/?$", views.IndicatorConfigView.as_view(), name="indicator-config"),
    re_path(r"^indicators/compute/?$", views.IndicatorComputeView.as_view(), name="indicator-compute"),
    re_path(r"^data/coverage/?$", views.coverage_view, name="data-coverage"),
    re_path(r"^data/series/?$", views.series_view, name="data-series"),
    re_path(r"^data/export/?$", views.export_create, name="data-export"),
    re_path(r"^data/export/(?P<pk>[0-9]{1,20})/?$", views.export_detail, name="data-export-detail"),
    re_path(r"^data/export/(?P<pk>[0-9]{1,20})/download/?$", views.export_download, name="data-export-download"),
]
