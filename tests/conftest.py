import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.cache import cache
from rest_framework.test import APIClient

from apps.jobs import collect

# The project's own apps: their models are what the API's permissions are about.
PROJECT_APPS = ["connectors", "jobs", "ratelimits", "marketdata", "monitoring"]


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings) -> None:
    # PBKDF2's deliberate slowness costs ~0.5 s per created user; tests need no real hashing strength.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _plain_static_names(settings) -> None:
    # Pages name static files as written, whatever manifest a local collectstatic left in STATIC_ROOT
    # (it would hash the names, or fail on files added since); tests/test_production_server.py checks
    # the hashed, compressed files the production storage makes.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture(autouse=True)
def _fresh_throttles() -> None:
    # DRF's throttles count in the cache, which outlives a test: each test starts with none counted.
    cache.clear()


@pytest.fixture(autouse=True)
def _no_remembered_gap_checks() -> None:
    # Collection remembers, per process, series it found without open gaps; a test's series are new.
    collect._no_open_gaps.clear()


def grant(user, *codenames: str, apps: list[str] = PROJECT_APPS):
    """Give `user` the permissions named (`view_job`, ...), or every permission of `apps` when none are."""
    perms = Permission.objects.filter(content_type__app_label__in=apps)
    if codenames:
        perms = perms.filter(codename__in=codenames)
        assert perms.count() == len(codenames), f"unknown permission among {codenames}"
    user.user_permissions.add(*perms)
    return get_user_model().objects.get(pk=user.pk)  # a fresh instance: permissions are cached per object


@pytest.fixture
def user(db):
    """An operator: every model permission of the project's apps, but not staff (no admin)."""
    return grant(get_user_model().objects.create_user("operator", password="operator-password-1"))


@pytest.fixture
def api_client(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def anon_client() -> APIClient:
    return APIClient()


@pytest.fixture
def simulated(db):
    from apps.connectors.models import Connector

    return Connector.objects.create(exchange_id="simulated", name="Simulated")


@pytest.fixture
def binance(db):
    from apps.connectors.models import Connector

    return Connector.objects.create(exchange_id="binance", name="Binance")


@pytest.fixture
def job(simulated):
    from apps.jobs.models import Job

    return Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m")
