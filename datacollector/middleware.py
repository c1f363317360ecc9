"""Refuse request bodies over MAX_REQUEST_BODY_BYTES before anything reads them."""

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


class RequestBodyLimitMiddleware:
    """413 when Content-Length exceeds MAX_REQUEST_BODY_BYTES; 411 for a body without Content-Length.

    Under WSGI, Django reads exactly Content-Length bytes of the body and nothing without it, so a
    chunked body (which gunicorn passes on without a length) would reach the view as an empty one:
    refusing it says so instead. Only the headers are looked at here; the body is left unread.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = settings.MAX_REQUEST_BODY_BYTES
        if request.META.get("HTTP_TRANSFER_ENCODING"):
            return JsonResponse(
                {"detail": f"Chunked bodies are not accepted: send Content-Length (at most {limit} bytes)."},
                status=411,
            )
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0:
            return JsonResponse({"detail": "Content-Length must be a number of bytes."}, status=400)
        if length > limit:
            return JsonResponse(
                {"detail": f"The request body is {length} bytes; the limit is {limit} bytes."}, status=413
            )
        return self.get_response(request)
