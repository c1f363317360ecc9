from django.urls import re_path
from rest_framework.routers import SimpleRouter

from apps.connectors import views

# The project's API router (datacollector/urls.py) takes over this registry, so that the browsable
# API root lists every app's endpoints; only the plain views are routed here.
router = SimpleRouter()
router.register("connectors", views.ConnectorViewSet)

urlpatterns = [
    re_path(r"^exchanges/?$", views.ExchangeListView.as_view(), name="exchange-list"),
    re_path(r"^exchanges/(?P<exchange_id>[^/]+)/?$", views.ExchangeDetailView.as_view(), name="exchange-detail"),
    re_path(r"^exchanges/(?P<exchange_id>[^/]+)/pairs/?$", views.ExchangePairsView.as_view(), name="exchange-pairs"),
    re_path(
        r"^exchanges/(?P<exchange_id>[^/]+)/timeframes/?$",
        views.ExchangeTimeframesView.as_view(),
        name="exchange-timeframes",
    ),
    re_path(r"^exchanges/(?P<exchange_id>[^/]+)/status/?$", views.ExchangeStatusView.as_view(), name="exchange-status"),
]
