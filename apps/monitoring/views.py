"""Health endpoints for load balancers and orchestrators; anonymous, JSON, never cached."""

import logging

import pymongo
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

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
    """Every component the product needs answers: the database, and MongoDB when configured."""
    checks = {"database": _check_database()}
    if settings.MONGODB_URI:
        checks["mongodb"] = _check_mongodb(settings.MONGODB_URI)
    failing = [name for name, check in checks.items() if check["status"] != "ok"]
    body = {"status": "unavailable" if failing else "ok", "checks": checks}
    if failing:
        body["failing"] = failing
    return JsonResponse(body, status=503 if failing else 200)


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
