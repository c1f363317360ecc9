"""Project-level API views that belong to no app."""

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import Throttled, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings

from datacollector.throttling import TokenClientThrottle, TokenUsernameThrottle, cool_off_seconds


class ObtainTokenView(ObtainAuthToken):
    """POST `username` and `password` (JSON or a form) for `{"token": ...}`.

    Limited per client address and per username (429 with Retry-After); after AXES_FAILURE_LIMIT wrong
    passwords the login is locked out for the cool-off, the right password included.
    """

    # DRF's own view hard-codes its parsers (multipart included); use the API's.
    parser_classes = api_settings.DEFAULT_PARSER_CLASSES
    throttle_classes = [TokenClientThrottle, TokenUsernameThrottle]

    def post(self, request: Request, *args: object, **kwargs: object) -> Response:
        try:
            return super().post(request, *args, **kwargs)
        except ValidationError:
            # axes flags the request it refused (or the failure that reached the limit); without this
            # the client would see the same 400 as for a wrong password.
            if getattr(request, "axes_locked_out", False):
                raise Throttled(
                    wait=cool_off_seconds(request), detail="Too many failed logins for this client or username."
                ) from None
            raise


obtain_token = ObtainTokenView.as_view()


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 404 for a URL that no route matches (handler404): under /api/, JSON like every other API
    answer (`/api/v1/jobs/1.5/` is such a URL: ids are digits); elsewhere, Django's page."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)
