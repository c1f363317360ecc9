"""Limits on how fast a client may call: the API per user and per anonymous client, the token endpoint
per client and per username (DRF throttles, counted in Django's cache), and failed logins everywhere
(django-axes, counted in the database), all answered with 429 and Retry-After.

Rates come from REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] (THROTTLE_* in the environment); axes reads
AXES_FAILURE_LIMIT and AXES_COOLOFF_TIME.
"""

import hashlib
import math
from typing import TYPE_CHECKING, Any

from axes.backends import AxesStandaloneBackend
from axes.helpers import get_cool_off
from django.http import HttpRequest, HttpResponse
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import AnonRateThrottle, BaseThrottle, SimpleRateThrottle, UserRateThrottle

if TYPE_CHECKING:
    # rest_framework.views imports the API settings, which import this module.
    from rest_framework.views import APIView


class CurrentRateMixin:
    """Reads the rate on every request rather than once at import, as DRF's SimpleRateThrottle does, so
    that a changed REST_FRAMEWORK setting applies at once; and always gives a whole-second wait, so that
    every 429 carries a usable Retry-After."""

    scope: str
    duration: int
    now: float
    history: list[float]

    def get_rate(self) -> str | None:
        self.THROTTLE_RATES = api_settings.DEFAULT_THROTTLE_RATES
        return super().get_rate()

    def wait(self) -> int:
        seconds = super().wait()
        if seconds is None:
            # DRF gives no wait when the history is longer than the (since lowered) rate allows.
            seconds = self.duration - (self.now - self.history[-1])
        return max(1, math.ceil(seconds))


class UserThrottle(CurrentRateMixin, UserRateThrottle):
    """Every API request of a logged-in user (scope `user`, THROTTLE_USER)."""


class AnonThrottle(CurrentRateMixin, AnonRateThrottle):
    """Every anonymous API request, per client address (scope `anon`, THROTTLE_ANON)."""


class TokenClientThrottle(CurrentRateMixin, SimpleRateThrottle):
    """Token requests per client address, whatever the username (scope `token_ip`, THROTTLE_TOKEN_IP)."""

    scope = "token_ip"

    def get_cache_key(self, request: Request, view: "APIView") -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class TokenUsernameThrottle(CurrentRateMixin, SimpleRateThrottle):
    """Token requests per username in the body, from any number of addresses (scope `token_username`,
    THROTTLE_TOKEN_USERNAME)."""

    scope = "token_username"

    def get_cache_key(self, request: Request, view: "APIView") -> str | None:
        username = request.data.get("username") if hasattr(request.data, "get") else None
        if not isinstance(username, str) or not username:
            return None  # The view answers 400; the per-client throttle still counts it.
        # Hashed: the username is the client's text, and cache keys have a length and character limit.
        ident = hashlib.sha256(username.encode()).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}


def client_ip(request: HttpRequest) -> str | None:
    """The client's address as DRF's throttles see it (REMOTE_ADDR, or X-Forwarded-For behind
    REST_FRAMEWORK["NUM_PROXIES"] trusted proxies); axes uses it too (AXES_CLIENT_IP_CALLABLE), so that
    both count the same client."""
    return BaseThrottle().get_ident(request)


def cool_off_seconds(request: HttpRequest | None = None) -> int:
    cool_off = get_cool_off(request)
    return max(1, math.ceil(cool_off.total_seconds())) if cool_off else 0


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict | None = None
) -> HttpResponse:
    """axes' answer to a locked-out login (AXES_LOCKOUT_CALLABLE): 429 with Retry-After, the whole
    cool-off (an upper bound: the lockout started at the last failure, at most that long ago)."""
    seconds = cool_off_seconds(request)
    response = HttpResponse(
        f"Too many failed logins: try again in {math.ceil(seconds / 60)} minutes.\n",
        status=429,
        content_type="text/plain; charset=utf-8",
    )
    response["Retry-After"] = str(seconds)
    return response


class LoginAttemptsBackend(AxesStandaloneBackend):
    """axes' lockout check, first in AUTHENTICATION_BACKENDS.

    Every login an HTTP client can reach (the admin, the browsable API, the token endpoint) passes its
    request to `authenticate()`; only code calls it without one (Django's test client `login()`, a
    shell). axes refuses those outright; there is no client to count, so they go on to the next backend.
    """

    def authenticate(self, request: HttpRequest | None, *args: Any, **kwargs: Any) -> None:
        if request is None:
            return None
        return super().authenticate(request, *args, **kwargs)
