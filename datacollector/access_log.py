"""One JSON access line per request, and a request id on every log line of that request.

The id comes from the `X-Request-ID` header when a proxy in front set a sane one (so its logs and ours
join), else a new one; it is sent back in the response's `X-Request-ID`. A logging filter adds it to
every record logged while the request is handled, the errors Django logs for it included.
"""

import contextvars
import logging
import re
import time
import uuid
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

logger = logging.getLogger("datacollector.access")

HEADER = "X-Request-ID"
# What is taken from a client: short, printable, no spaces (it lands in every log line as is).
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        given = request.headers.get(HEADER, "")
        rid = given if _ACCEPTED_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.monotonic()
        try:
            response = self.get_response(request)
            response[HEADER] = rid
            logger.info(
                "%s %s %s",
                request.method,
                request.path,
                response.status_code,
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "duration_ms": round((time.monotonic() - started) * 1000, 2),
                    "client": request.META.get("REMOTE_ADDR", ""),
                    "user_agent": request.headers.get("User-Agent", "")[:200],
                },
            )
            return response
        finally:
            request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to records logged during a request (nothing outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return True
