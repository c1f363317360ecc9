import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings) -> None:
    # PBKDF2's deliberate slowness costs ~0.5 s per created user; tests need no real hashing strength.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user("operator", password="operator-password-1")


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
