from django.urls import path

from apps.marketdata import views

urlpatterns = [
    path("data/ohlcv", views.ohlcv, name="data-ohlcv"),
    path("data/indicators", views.indicators, name="data-indicators"),
]
