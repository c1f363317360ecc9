from django.urls import path, re_path

from apps.marketdata import views

urlpatterns = [
    path("data/ohlcv", views.ohlcv, name="data-ohlcv"),
    path("data/indicators", views.indicators, name="data-indicators"),
    re_path(r"^indicators/?$", views.IndicatorListView.as_view(), name="indicator-list"),
    re_path(r"^indicators/config/?$", views.IndicatorConfigView.as_view(), name="indicator-config"),
    re_path(r"^indicators/compute/?$", views.IndicatorComputeView.as_view(), name="indicator-compute"),
    re_path(r"^data/export/?$", views.export_create, name="data-export"),
    re_path(r"^data/export/(?P<pk>[0-9]{1,20})/?$", views.export_detail, name="data-export-detail"),
    re_path(r"^data/export/(?P<pk>[0-9]{1,20})/download/?$", views.export_download, name="data-export-download"),
]
