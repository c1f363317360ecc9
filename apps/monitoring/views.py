"""Health endpoints for load balancers and orchestrators (anonymous, JSON, never cached) and the
Prometheus metrics export."""

import logging
import secrets

import pymongo
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from django_prometheus.exports import ExportToDjangoView
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.monitoring.status import runs_in_flight, system_stats, system_status
from datacollector.permissions import requires

logger = logging.getLogger(__name__)

# A readiness probe must answer well within the orchestrator's own timeout even when MongoDB is down.
MONGODB_TIMEOUT_MS = 2000


@never_cache
@require_GET
def live(request: HttpRequest) -> JsonResponse:
    """The process serves requests. Touches nothing else, so a database outage never restarts the web."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    """Every component the product needs answers: the database, and MongoDB when configured.

    Anyone sees the status and which components fail; only staff see each check's error, which names
    hosts and ports.
    """
    checks = component_checks()
    failing = [name for name, check in checks.items() if check["status"] != "ok"]
    body = {"status": "unavailable" if failing else "ok"}
    if failing:
        body["failing"] = failing
    if _is_staff(request):
        body["checks"] = checks
    return JsonResponse(body, status=503 if failing else 200)


def component_checks() -> dict[str, dict[str, str]]:
    """The database, and MongoDB when configured: {"status": "ok"} or {"status": "error", "error": ...}."""
    checks = {"database": _check_database()}
    if settings.MONGODB_URI:
        checks["mongodb"] = _check_mongodb(settings.MONGODB_URI)
    return checks


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """django-prometheus' export; with METRICS_TOKEN set, only for `Authorization: Bearer <token>`."""
    expected = settings.METRICS_TOKEN
    if expected:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Constant time: the comparison must not tell a guesser how much of the token was right.
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected.encode()):
            response = HttpResponse(
                "Send Authorization: Bearer <METRICS_TOKEN>.\n", status=401, content_type="text/plain"
            )
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    return ExportToDjangoView(request)


def _is_staff(request: HttpRequest) -> bool:
    # The user comes from the session, which lives in the database this probe may have just found down.
    try:
        return request.user.is_active and request.user.is_staff
    except DatabaseError:
        return False


def _check_database() -> dict[str, str]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        logger.warning("readiness: database unreachable: %s", exc)
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok"}


def _check_mongodb(uri: str) -> dict[str, str]:
    # A client of its own with short timeouts: the store's shared client may use longer ones.
    client = None
    try:
        client = pymongo.MongoClient(
            uri,
            serverSelectionTimeoutMS=MONGODB_TIMEOUT_MS,
            connectTimeoutMS=MONGODB_TIMEOUT_MS,
            socketTimeoutMS=MONGODB_TIMEOUT_MS,
        )
        client.admin.command("ping")
    except Exception as exc:
        logger.warning("readiness: mongodb unreachable: %s", exc)
        # The first line is enough; pymongo appends a long topology description.
        return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    finally:
        if client is not None:
            client.close()
    return {"status": "ok"}


class SystemStatusView(APIView):
    """Version, database, candle store, schedulers alive and lost, jobs overdue, runs in flight, exchanges
    backing off. 503 (with the same body) when a component fails, like /health/ready; `degraded` names what
    is wrong otherwise (no scheduler alive, exchanges backing off)."""

    permission_classes = [requires("monitoring.view_schedulerprocess")]

    @extend_schema(responses={200: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT})
    def get(self, request: Request) -> Response:
        body = system_status(component_checks())
        if not (request.user.is_staff or request.user.is_superuser):
            # The checks' errors name hosts and ports: staff only, as on /health/ready.
            body["checks"] = {name: {"status": check["status"]} for name, check in body["checks"].items()}
        return Response(body, status=200 if body["ok"] else 503)


class SystemStatsView(APIView):
    """Candles and series stored; requests, rate-limit answers (429/418) and runs by outcome over the last
    hour and day."""

    permission_classes = [requires("jobs.view_run")]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        return Response(system_stats())


class SystemJobsView(APIView):
    """The runs in flight, oldest first: worker, series, pages so far, age."""

    permission_classes = [requires("jobs.view_run")]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        runs = runs_in_flight()
        return Response({"count": len(runs), "runs": runs})
