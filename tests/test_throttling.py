"""Throttles and login lockouts: the API per user, the token endpoint per client and per username (DRF),
failed logins on the admin and the token endpoint (django-axes); each answers 429 with Retry-After."""

import socket
import uuid
from datetime import timedelta

import environ
import pytest
import redis
import time_machine
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory

from datacollector.throttling import AnonThrottle
from tests.conftest import grant

TOKEN_URL = "/api/v1/auth/token"
ADMIN_LOGIN = "/admin/login/"
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def throttle_rates(settings):
    """Set some throttle rates for this test; the others keep their configured value."""

    def set_rates(**rates: str | None) -> None:
        current = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]
        settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {**current, **rates}}

    return set_rates


@pytest.fixture
def robot(db):
    return grant(get_user_model().objects.create_user("robot", password="robot-password-1"), "view_job")


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("boss", password="boss-password-1", is_staff=True, is_superuser=True)


def token_request(username: str, password: str, ip: str = "10.0.0.1", **headers: str):
    return APIClient().post(
        TOKEN_URL, {"username": username, "password": password}, format="json", REMOTE_ADDR=ip, **headers
    )


def admin_login(username: str, password: str, ip: str = "10.0.0.1"):
    return Client(REMOTE_ADDR=ip).post(ADMIN_LOGIN, {"username": username, "password": password, "next": "/admin/"})


def assert_throttled(response) -> None:
    assert response.status_code == 429
    assert int(response["Retry-After"]) >= 1


# --- The API per user --------------------------------------------------------------------------------


def test_the_api_is_throttled_per_user(api_client, user, throttle_rates) -> None:
    throttle_rates(user="3/minute")

    answers = [api_client.get("/api/v1/jobs/").status_code for _ in range(3)]
    throttled = api_client.get("/api/v1/jobs/")

    assert answers == [200, 200, 200]
    assert_throttled(throttled)
    assert int(throttled["Retry-After"]) <= 60
    other = APIClient()
    other.force_authenticate(grant(get_user_model().objects.create_user("other"), "view_job"))
    assert other.get("/api/v1/jobs/").status_code == 200


def test_a_user_may_call_again_once_the_window_has_passed(api_client, throttle_rates) -> None:
    throttle_rates(user="2/minute")
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        api_client.get("/api/v1/jobs/")
        api_client.get("/api/v1/jobs/")
        assert api_client.get("/api/v1/jobs/").status_code == 429

        traveller.shift(timedelta(seconds=61))

        assert api_client.get("/api/v1/jobs/").status_code == 200


def test_a_rate_changed_at_run_time_applies_at_once(api_client, throttle_rates) -> None:
    throttle_rates(user="100/minute")
    for _ in range(3):
        assert api_client.get("/api/v1/jobs/").status_code == 200

    throttle_rates(user="2/minute")

    # The history holds more requests than the new rate allows: still a 429 with a Retry-After.
    assert_throttled(api_client.get("/api/v1/jobs/"))


def test_anonymous_requests_are_throttled_per_client_address(throttle_rates) -> None:
    # No API view that anonymous callers may use has the default throttles (the token endpoint has its
    # own), so the throttle is exercised on a request directly.
    throttle_rates(anon="2/minute")
    factory = APIRequestFactory()

    def allowed(ip: str) -> bool:
        return AnonThrottle().allow_request(Request(factory.get("/api/v1/", REMOTE_ADDR=ip)), None)

    assert [allowed("10.0.0.7") for _ in range(3)] == [True, True, False]
    assert allowed("10.0.0.8")


# --- The token endpoint (DRF throttles) -------------------------------------------------------------


def test_the_token_endpoint_is_throttled_per_client_address(robot, throttle_rates, settings) -> None:
    throttle_rates(token_ip="3/minute", token_username=None)
    settings.AXES_ENABLED = False  # this test counts requests, not failed logins

    answers = [token_request(f"guess-{n}", "wrong", ip="10.0.0.1").status_code for n in range(3)]
    throttled = token_request("robot", "robot-password-1", ip="10.0.0.1")

    assert answers == [400, 400, 400]
    assert_throttled(throttled)
    assert token_request("robot", "robot-password-1", ip="10.0.0.2").status_code == 200


def test_a_forged_forwarded_for_header_does_not_make_a_new_client(robot, throttle_rates, settings) -> None:
    throttle_rates(token_ip="2/minute", token_username=None)
    settings.AXES_ENABLED = False

    for n in range(2):
        token_request("robot", "wrong", ip="10.0.0.1", HTTP_X_FORWARDED_FOR=f"192.0.2.{n}")

    assert_throttled(token_request("robot", "robot-password-1", ip="10.0.0.1", HTTP_X_FORWARDED_FOR="192.0.2.99"))


def test_the_token_endpoint_is_throttled_per_username_from_any_address(robot, throttle_rates, settings) -> None:
    throttle_rates(token_ip=None, token_username="2/minute")
    settings.AXES_ENABLED = False

    answers = [token_request("robot", "wrong", ip=f"10.0.1.{n}").status_code for n in range(2)]
    throttled = token_request("robot", "robot-password-1", ip="10.0.1.99")

    assert answers == [400, 400]
    assert_throttled(throttled)
    assert token_request("someone-else", "x", ip="10.0.1.99").status_code == 400


def test_normal_use_of_the_token_endpoint_is_not_throttled_by_default(robot) -> None:
    for _ in range(3):
        assert token_request("robot", "robot-password-1").status_code == 200


# --- Failed logins (django-axes) --------------------------------------------------------------------


@pytest.fixture
def lockout(settings, throttle_rates):
    """Three failures lock out for 15 minutes; the DRF token throttles are off so only axes counts."""
    settings.AXES_FAILURE_LIMIT = 3
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)
    throttle_rates(token_ip=None, token_username=None)


def test_wrong_passwords_on_the_token_endpoint_lock_the_username_out_until_the_cool_off(robot, lockout) -> None:
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        answers = [token_request("robot", "wrong", ip=f"10.0.2.{n}").status_code for n in range(3)]
        right_password = token_request("robot", "robot-password-1", ip="10.0.2.50")

        assert answers == [400, 400, 429]
        assert_throttled(right_password)
        assert int(right_password["Retry-After"]) == 15 * 60
        assert "token" not in right_password.json()

        traveller.shift(timedelta(minutes=16))

        assert token_request("robot", "robot-password-1", ip="10.0.2.50").status_code == 200


def test_wrong_passwords_on_the_admin_login_lock_out_with_429(staff, lockout) -> None:
    with time_machine.travel(timezone.now(), tick=False) as traveller:
        answers = [admin_login("boss", "wrong", ip=f"10.0.3.{n}").status_code for n in range(2)]
        locked = admin_login("boss", "wrong", ip="10.0.3.9")
        right_password = admin_login("boss", "boss-password-1", ip="10.0.3.10")

        assert answers == [200, 200]  # the form again, with its error
        assert_throttled(locked)
        assert_throttled(right_password)
        assert int(right_password["Retry-After"]) == 15 * 60

        traveller.shift(timedelta(minutes=16))

        logged_in = admin_login("boss", "boss-password-1", ip="10.0.3.10")
        assert logged_in.status_code == 302
        assert logged_in["Location"] == "/admin/"


def test_one_client_guessing_many_usernames_is_locked_out(staff, lockout) -> None:
    for n in range(3):
        admin_login(f"nobody-{n}", "wrong", ip="10.0.4.1")

    assert_throttled(admin_login("boss", "boss-password-1", ip="10.0.4.1"))
    assert admin_login("boss", "boss-password-1", ip="10.0.4.2").status_code == 302


def test_logging_in_to_an_own_account_does_not_reset_the_count(staff, robot, lockout) -> None:
    admin_login("boss", "wrong", ip="10.0.6.1")
    admin_login("boss", "wrong", ip="10.0.6.1")
    # The browsable API's login logs in (the token endpoint does not), which is what axes resets on.
    own_login = Client(REMOTE_ADDR="10.0.6.1").post(
        "/api/auth/login/", {"username": "robot", "password": "robot-password-1"}
    )
    assert own_login.status_code == 302

    assert_throttled(admin_login("boss", "wrong", ip="10.0.6.1"))
    assert_throttled(admin_login("boss", "boss-password-1", ip="10.0.6.1"))


def test_the_token_endpoint_and_the_admin_count_the_same_failures(staff, lockout) -> None:
    token_request("boss", "wrong", ip="10.0.5.1")
    token_request("boss", "wrong", ip="10.0.5.2")
    admin_login("boss", "wrong", ip="10.0.5.3")

    assert_throttled(admin_login("boss", "boss-password-1", ip="10.0.5.4"))


def test_logins_without_a_request_still_work(client, staff) -> None:
    # Django's test client calls authenticate() without a request, which axes alone would refuse.
    assert client.login(username="boss", password="boss-password-1")
    assert client.get("/admin/").status_code == 200


# --- A shared cache ---------------------------------------------------------------------------------


def redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not redis_answers(), reason="no Redis at 127.0.0.1:6379")
def test_throttles_count_in_a_shared_redis_cache(api_client, user, throttle_rates, settings) -> None:
    prefix = f"dc-test-{uuid.uuid4().hex}"
    # CACHE_URL as production sets it, with a key prefix of this test's own.
    settings.CACHES = {"default": {**environ.Env.cache_url_config(REDIS_URL), "KEY_PREFIX": prefix}}
    throttle_rates(user="2/minute")
    server = redis.Redis.from_url(REDIS_URL)
    try:
        assert settings.CACHES["default"]["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
        assert [api_client.get("/api/v1/jobs/").status_code for _ in range(2)] == [200, 200]

        assert_throttled(api_client.get("/api/v1/jobs/"))
        # The count lives in Redis, where every web worker reads it.
        assert server.keys(f"{prefix}:*:throttle_user_{user.pk}")
    finally:
        for key in server.scan_iter(f"{prefix}:*"):
            server.delete(key)
        server.close()
