"""Secrets stay home: credential variable names, credentials in options, custom urls, credential hosts.

The host checks use the real ccxt library against the local fake Binance (127.0.0.1); nothing leaves
the machine (requests to any other host are refused before they are sent).
"""

import re
from pathlib import Path

import ccxt
import pytest
from django.conf import settings as django_settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import RequestFactory
from django.urls import reverse
from rest_framework.test import APIClient

from apps.connectors import exchanges
from apps.connectors.exchanges import (
    CCXT_CREDENTIAL_FIELDS,
    CcxtClient,
    PermanentExchangeError,
    credential_env_error,
    get_client,
)
from apps.connectors.models import Connector, credential_paths, is_credential_key
from tests.connectors.test_admin import CONNECTOR_FORM
from tests.fakes.binance import FakeBinance

ROOT = Path(__file__).resolve().parents[2]
KEY = "key-from-env-3f9a"
SECRET = "secret-from-env-77c1"
FAKE_URLS = {"api": {"public": "http://127.0.0.1:9/api/v3", "private": "http://127.0.0.1:9/api/v3"}}


def make_user(username: str, *codenames: str, is_staff: bool = False):
    """A user with exactly these connector permissions (the API may check model permissions or not)."""
    user = get_user_model().objects.create_user(username, password=f"{username}-password-1", is_staff=is_staff)
    perms = Permission.objects.filter(content_type__app_label="connectors", codename__in=codenames)
    assert perms.count() == len(codenames)
    user.user_permissions.add(*perms)
    return get_user_model().objects.get(pk=user.pk)  # permissions are cached per instance


CONNECTOR_PERMS = ("add_connector", "change_connector", "view_connector", "delete_connector")


@pytest.fixture
def operator(db):
    """Not staff; may add, change, view and delete connectors, but not set their urls."""
    return make_user("member", *CONNECTOR_PERMS)


@pytest.fixture
def member_api(operator) -> APIClient:
    client = APIClient()
    client.force_authenticate(operator)
    return client


def client_for(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


# --- Credentials in options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"twofa": "123456"}, "options.twofa"),
        ({"accountId": "123"}, "options.accountId"),
        ({"headers": {"X-MBX-APIKEY": "k"}}, "options.headers.X-MBX-APIKEY"),
        ({"options": {"apiKey": "k"}}, "options.options.apiKey"),
        ({"headers": {"Authorization": "Bearer k"}}, "options.headers.Authorization"),
        ({"headers": {"OK-ACCESS-PASSPHRASE": "p"}}, "options.headers.OK-ACCESS-PASSPHRASE"),
        ({"options": {"brokers": [{"x": 1}, {"private_key": "0xabc"}]}}, "options.options.brokers[1].private_key"),
        ({"API_SECRET": "s"}, "options.API_SECRET"),
        ({"options": {"endpoint": "https://me:hunter2@example.com/"}}, "options.options.endpoint"),
    ],
)
def test_credentials_anywhere_in_options_are_a_400_naming_the_key(member_api, options, path) -> None:
    response = member_api.post("/api/v1/connectors/", {"exchange_id": "binance", "options": options}, format="json")

    assert response.status_code == 400, response.data
    message = str(response.data["options"])
    assert f"must not hold credentials: {path}." in message
    assert "api_key_env" in message  # where credentials go instead
    assert not Connector.objects.exists()


def test_harmless_ccxt_options_are_accepted(member_api) -> None:
    options = {
        "timeout": 5000,
        "sandbox": False,
        "verbose": False,
        "headers": {"User-Agent": "collector"},
        "options": {
            "recvWindow": 5000,
            "adjustForTimeDifference": True,
            "defaultType": "spot",
            "fetchMarkets": {"types": ["spot"]},
        },
    }
    response = member_api.post("/api/v1/connectors/", {"exchange_id": "binance", "options": options}, format="json")

    assert response.status_code == 201, response.data
    assert Connector.objects.get().options == options


def test_every_credential_field_ccxt_knows_is_refused() -> None:
    required = set()
    for exchange_id in ccxt.exchanges:
        required |= set(getattr(ccxt, exchange_id)().describe().get("requiredCredentials", {}))

    assert required <= CCXT_CREDENTIAL_FIELDS
    assert {"apiKey", "secret", "uid", "login", "password", "twofa", "privateKey", "walletAddress"} <= required
    for field in required:
        assert is_credential_key(field)
        assert is_credential_key(field.upper())
    assert all(map(is_credential_key, ["api-key", "X_Api_Key", "x-signature", "ACCESS-TOKEN", "Cookie"]))
    harmless = ["recvWindow", "adjustForTimeDifference", "defaultType", "fetchMarkets", "timeout", "urls", "sandbox"]
    assert not any(map(is_credential_key, [*harmless, "verbose", "headers", "options", "hostname", "User-Agent"]))


def test_a_deep_options_document_is_searched_without_recursion() -> None:
    options: dict = {"leaf": {"Secret": "s"}}
    for _ in range(5000):
        options = {"n": options}

    paths = credential_paths(options)

    assert paths == ["options" + ".n" * 5000 + ".leaf.Secret"]


# --- Credential variable names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "name", "expected"),
    [
        ("api_key_env", "DATABASE_URL", "CREDENTIAL_ENV_PATTERN"),  # not a credential-shaped name
        ("api_key_env", "HOME", "CREDENTIAL_ENV_PATTERN"),
        ("api_secret_env", "sk-live 123/abc", "NAME of an environment variable"),
        ("api_key_env", "SECRET_KEY", "cannot be SECRET_KEY"),  # credential-shaped, but the project's own
        ("api_password_env", "DJANGO_SUPERUSER_PASSWORD", "cannot be DJANGO_SUPERUSER_PASSWORD"),
        ("api_secret_env", "POSTGRES_PASSWORD", "cannot be POSTGRES_PASSWORD"),
    ],
)
def test_refused_credential_variable_names_are_a_400_naming_the_field(member_api, field, name, expected) -> None:
    response = member_api.post("/api/v1/connectors/", {"exchange_id": "binance", field: name}, format="json")

    assert response.status_code == 400, response.data
    message = str(response.data[field])
    assert expected in message
    assert field in message
    assert not Connector.objects.exists()


def test_credential_variable_names_matching_the_pattern_are_accepted(member_api) -> None:
    names = {"api_key_env": "BINANCE_API_KEY", "api_secret_env": "BINANCE_SECRET", "api_password_env": "OKX_PASSPHRASE"}

    response = member_api.post("/api/v1/connectors/", {"exchange_id": "binance", **names}, format="json")

    assert response.status_code == 201, response.data


def test_the_pattern_is_the_operators_setting(member_api, settings) -> None:
    settings.CREDENTIAL_ENV_PATTERN = r"COLLECTOR_[A-Z0-9_]+"

    url = "/api/v1/connectors/"
    refused = member_api.post(url, {"exchange_id": "binance", "api_key_env": "BINANCE_API_KEY"}, format="json")
    accepted = member_api.post(url, {"exchange_id": "binance", "api_key_env": "COLLECTOR_BN_KEY"}, format="json")

    assert refused.status_code == 400
    assert "COLLECTOR_[A-Z0-9_]+" in str(refused.data["api_key_env"])
    assert accepted.status_code == 201, accepted.data


def _reserved(name: str) -> bool:
    return name in django_settings.RESERVED_ENV_NAMES or name.startswith(django_settings.RESERVED_ENV_PREFIXES)


def test_every_variable_the_project_reads_is_reserved() -> None:
    settings_source = (ROOT / "datacollector" / "settings.py").read_text()
    read_by_settings = set(re.findall(r"\benv(?:\.\w+)?\(\s*[\"']([A-Za-z_][A-Za-z0-9_]*)[\"']", settings_source))
    # Uncommented lines only: the commented exchange-key examples are what connectors are meant to name.
    example = (ROOT / ".env.example").read_text()
    in_example = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=", example, flags=re.MULTILINE))
    read_elsewhere = set()
    for path in [*(ROOT / "apps").rglob("*.py"), *(ROOT / "datacollector").rglob("*.py")]:
        source = path.read_text()
        read_elsewhere |= set(re.findall(r"(?:environ\.get\(|environ\[|getenv\()\s*[\"']([A-Za-z_]\w*)[\"']", source))

    assert {"DATABASE_URL", "SECRET_KEY", "MONGODB_URI"} <= read_by_settings  # the scan finds them
    assert "DJANGO_SUPERUSER_PASSWORD" in in_example
    unreserved = sorted(name for name in read_by_settings | in_example | read_elsewhere if not _reserved(name))
    assert unreserved == [], f"add these to RESERVED_ENV_NAMES in datacollector/settings.py: {unreserved}"
    for name in read_by_settings | in_example | read_elsewhere:
        assert credential_env_error("api_key_env", name) is not None


def test_a_stored_row_naming_a_project_variable_stops_before_reading_it(db, monkeypatch) -> None:
    # A row saved before the rule (update() skips validation, as an old row never met it).
    monkeypatch.setenv("DATABASE_URL", "postgres://postgres:pw@db/collector")
    connector = Connector.objects.create(exchange_id="binance")
    Connector.objects.filter(pk=connector.pk).update(api_key_env="DATABASE_URL")
    connector.refresh_from_db()
    exchanges.clear_clients()

    with pytest.raises(PermanentExchangeError, match="api_key_env must be the NAME") as caught:
        get_client(connector)

    assert "postgres://" not in str(caught.value)


# --- Custom urls need a permission --------------------------------------------------------------------


def test_a_member_without_the_permission_cannot_set_urls(member_api) -> None:
    response = member_api.post(
        "/api/v1/connectors/", {"exchange_id": "binance", "options": {"urls": FAKE_URLS}}, format="json"
    )

    assert response.status_code == 403
    assert "options.urls" in str(response.data["detail"])
    assert "connectors.set_connector_urls" in str(response.data["detail"])
    assert not Connector.objects.exists()


def test_a_member_with_the_permission_can_set_urls(db) -> None:
    user = make_user("integrator", *CONNECTOR_PERMS, "set_connector_urls")

    response = client_for(user).post(
        "/api/v1/connectors/", {"exchange_id": "binance", "options": {"urls": FAKE_URLS}}, format="json"
    )

    assert response.status_code == 201, response.data
    assert Connector.objects.get().options == {"urls": FAKE_URLS}


def test_staff_can_set_urls(db) -> None:
    staff = make_user("staffer", *CONNECTOR_PERMS, is_staff=True)

    response = client_for(staff).post(
        "/api/v1/connectors/", {"exchange_id": "binance", "options": {"urls": FAKE_URLS}}, format="json"
    )

    assert response.status_code == 201, response.data


def test_a_member_may_keep_or_remove_stored_urls_but_not_change_them(member_api, db) -> None:
    connector = Connector.objects.create(exchange_id="binance", options={"urls": FAKE_URLS, "timeout": 1000})
    url = f"/api/v1/connectors/{connector.pk}/"
    other = {"api": {"public": "http://127.0.0.1:8/api/v3"}}

    kept = member_api.patch(url, {"name": "B", "options": {"urls": FAKE_URLS, "timeout": 2000}}, format="json")
    changed = member_api.patch(url, {"options": {"urls": other, "timeout": 2000}}, format="json")
    connector.refresh_from_db()
    assert connector.options == {"urls": FAKE_URLS, "timeout": 2000}
    removed = member_api.patch(url, {"options": {"timeout": 2000}}, format="json")

    assert kept.status_code == 200, kept.data
    assert changed.status_code == 403
    assert removed.status_code == 200, removed.data
    connector.refresh_from_db()
    assert connector.options == {"timeout": 2000}


# --- The admin form reports the same rules -------------------------------------------------------------


def test_admin_form_shows_errors_for_credentials_in_options_and_a_project_variable(admin_client, db) -> None:
    response = admin_client.post(
        reverse("admin:connectors_connector_add"),
        {
            **CONNECTOR_FORM,
            "exchange_id": "binance",
            "options": '{"headers": {"X-MBX-APIKEY": "k"}}',
            "api_key_env": "SECRET_KEY",
        },
    )

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "options.headers.X-MBX-APIKEY" in " ".join(errors["options"])
    assert "cannot be SECRET_KEY" in " ".join(errors["api_key_env"])
    assert not Connector.objects.exists()


def test_admin_form_refuses_urls_to_a_user_without_the_permission(operator) -> None:
    # The admin site admits staff only, and staff may set urls; this checks the form's own rule for a
    # user who is neither (as a differently configured admin site could let in).
    request = RequestFactory().post("/")
    request.user = operator
    form_class = admin.site._registry[Connector].get_form(request)
    data = {**CONNECTOR_FORM, "exchange_id": "binance", "options": '{"urls": {"api": "http://127.0.0.1:9"}}'}

    form = form_class(data=data)

    assert not form.is_valid()
    assert "options.urls" in " ".join(form.errors["options"])


def test_admin_form_lets_staff_set_urls(admin_client, db) -> None:
    options = '{"urls": {"api": {"public": "http://127.0.0.1:9/api/v3"}}}'
    response = admin_client.post(
        reverse("admin:connectors_connector_add"), {**CONNECTOR_FORM, "exchange_id": "binance", "options": options}
    )

    assert response.status_code == 302
    assert Connector.objects.get().options["urls"]["api"]["public"] == "http://127.0.0.1:9/api/v3"


# --- Credentials go only to the exchange's own hosts ----------------------------------------------------


@pytest.fixture
def fake():
    server = FakeBinance({"BTC/USDT": 1_700_000_000_000}, now_ms=1_700_086_400_000).start()
    yield server
    server.stop()


@pytest.fixture
def keyed_connector(db, fake, monkeypatch) -> Connector:
    monkeypatch.setenv("TEST_BINANCE_API_KEY", KEY)
    monkeypatch.setenv("TEST_BINANCE_SECRET", SECRET)
    exchanges.clear_clients()
    yield Connector.objects.create(
        exchange_id="binance",
        options=fake.ccxt_options(timeout=2000),
        api_key_env="TEST_BINANCE_API_KEY",
        api_secret_env="TEST_BINANCE_SECRET",
    )
    exchanges.clear_clients()


def _saw_key(fake: FakeBinance) -> bool:
    return any(headers.get("X-MBX-APIKEY") == KEY for headers in fake.request_headers)


def test_credentials_are_not_sent_to_a_host_that_is_not_the_exchanges(keyed_connector, fake) -> None:
    with pytest.raises(PermanentExchangeError) as caught:
        get_client(keyed_connector)

    message = str(caught.value)
    assert "credentials are not sent to 127.0.0.1 (options.urls.api." in message
    assert "CREDENTIAL_HOSTS_ALLOWED" in message
    assert "api.binance.com" in message  # what the exchange's own hosts are
    assert fake.request_headers == []  # nothing was sent at all
    assert not _saw_key(fake)


def test_an_allowed_host_receives_the_key_as_a_header(keyed_connector, fake, settings) -> None:
    settings.CREDENTIAL_HOSTS_ALLOWED = ["127.0.0.1"]
    client = get_client(keyed_connector)
    assert client.markets() == ["BTC/USDT"]  # public: Binance sends no key there
    assert not _saw_key(fake)

    # An endpoint Binance wants the key for (the fake answers 404: what matters is what reached it).
    # Not fetch_balance(): with a key, ccxt also asks api.binance.com, which a test must not reach.
    with pytest.raises(ccxt.BaseError):
        client.exchange.public_get_historicaltrades({"symbol": "BTCUSDT"})

    assert _saw_key(fake)
    assert all(SECRET not in str(headers) for headers in fake.request_headers)


def test_a_request_to_another_host_is_refused_before_it_is_sent(keyed_connector, fake, settings) -> None:
    settings.CREDENTIAL_HOSTS_ALLOWED = ["127.0.0.1"]
    client = get_client(keyed_connector)

    # What an exchange's code might build from its options rather than from urls.
    with pytest.raises(PermanentExchangeError, match="credentials are not sent to localhost"):
        client.exchange.fetch("http://localhost:9/api/v3/account", "GET", {"X-MBX-APIKEY": KEY})


@pytest.mark.parametrize(
    ("exchange_id", "options", "where"),
    [
        ("binance", {"httpsProxy": "http://127.0.0.1:9"}, "127.0.0.1 (options.httpsProxy)"),
        ("binance", {"proxyUrl": "http://127.0.0.1:9/"}, "127.0.0.1 (options.proxyUrl)"),
        ("bybit", {"hostname": "collector.invalid"}, ".collector.invalid (options.urls."),
    ],
)
def test_proxies_and_hostnames_count_as_hosts(db, exchange_id, options, where) -> None:
    with pytest.raises(PermanentExchangeError, match=re.escape(where)):
        CcxtClient(exchange_id, options, {"apiKey": KEY, "secret": SECRET})


def test_the_exchanges_own_hosts_take_credentials_and_no_custom_urls_need_no_check(db) -> None:
    own = CcxtClient("binance", {"sandbox": True}, {"apiKey": KEY, "secret": SECRET})  # no request is made
    anonymous = CcxtClient("binance", {"urls": FAKE_URLS}, {})

    assert own.exchange.apiKey == KEY
    assert anonymous.exchange.urls["api"]["public"] == FAKE_URLS["api"]["public"]
