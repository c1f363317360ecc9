"""URL map: the admin, the REST API under /api/v1/, its schema and docs, health, and Prometheus metrics."""

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from apps.connectors.urls import router as connectors_router
from apps.jobs.urls import router as jobs_router
from apps.marketdata.urls import router as marketdata_router
from apps.ratelimits.urls import router as ratelimits_router
from datacollector.views import obtain_token

handler404 = "datacollector.views.not_found"

admin.site.site_header = "Data Collector"
admin.site.site_title = "Data Collector admin"
admin.site.index_title = "Connectors, jobs, runs and rate limits"


class ApiRouter(DefaultRouter):
    """One router for the whole API, so that its browsable root lists every app's endpoints."""

    # Plain views the root should link too; a name that does not resolve is left out by DRF.
    extra_root_views = {
        "exchanges": "exchange-list",
        "data/ohlcv": "data-ohlcv",
        "data/indicators": "data-indicators",
        "data/coverage": "data-coverage",
        "data/export": "data-export",
        "system/status": "system-status",
        "indicators": "indicator-list",
        "auth/token": "api-token",
    }

    def get_api_root_view(self, api_urls: list | None = None):
        list_name = self.routes[0].name
        api_root_dict = {prefix: list_name.format(basename=basename) for prefix, _, basename in self.registry}
        return self.APIRootView.as_view(api_root_dict={**api_root_dict, **self.extra_root_views})


api_router = ApiRouter()
for app_router in (connectors_router, jobs_router, ratelimits_router, marketdata_router):
    api_router.registry.extend(app_router.registry)
# Accept paths with or without the trailing slash: a POST to `jobs/bulk` must not hit APPEND_SLASH's
# redirect (which cannot carry a body) and fail.
api_router.trailing_slash = "/?"

api_v1 = [
    re_path(r"^auth/token/?$", obtain_token, name="api-token"),
    path("", include("apps.connectors.urls")),
    path("", include("apps.jobs.urls")),
    path("", include("apps.ratelimits.urls")),
    path("", include("apps.marketdata.urls")),
    path("", include("apps.monitoring.api_urls")),
    path("", include(api_router.urls)),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/auth/", include("rest_framework.urls")),  # log in/out links of the browsable API
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("apps.monitoring.urls")),
]
