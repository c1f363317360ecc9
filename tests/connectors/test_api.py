import pytest

from apps.connectors.models import Connector
from apps.jobs.models import Job
from datacollector.config import get_config


def test_connector_is_created_with_rate_limit_defaults_from_the_yaml(api_client, db) -> None:
    response = api_client.post("/api/v1/connectors/", {"exchange_id": "binance", "name": "Binance"}, format="json")

    assert response.status_code == 201, response.data
    defaults = get_config().rate_limit_for("binance")
    assert response.data["rate_limit_weight_per_minute"] == defaults.weight_per_minute
    assert response.data["rate_limit_burst"] == defaults.burst
    assert response.data["options"] == {}
    assert response.data["job_count"] == 0


def test_connector_options_and_env_names_are_stored(api_client, db) -> None:
    options = {"timeout": 5000, "options": {"defaultType": "spot"}}  # urls: tests/connectors/test_secrets.py
    response = api_client.post(
        "/api/v1/connectors/",
        {"exchange_id": "kraken", "options": options, "api_key_env": "KRAKEN_KEY", "rate_limit_burst": 5},
        format="json",
    )

    assert response.status_code == 201, response.data
    connector = Connector.objects.get(exchange_id="kraken")
    assert connector.options == options
    assert connector.api_key_env == "KRAKEN_KEY"
    assert connector.rate_limit_burst == 5


def test_unknown_exchange_id_is_a_400_pointing_to_the_exchange_list(api_client, db) -> None:
    response = api_client.post("/api/v1/connectors/", {"exchange_id": "binanse"}, format="json")

    assert response.status_code == 400
    message = str(response.data["exchange_id"])
    assert "Unknown exchange id 'binanse'" in message
    assert "GET /api/v1/exchanges" in message


def test_duplicate_connector_is_a_400_not_a_500(api_client, binance) -> None:
    response = api_client.post("/api/v1/connectors/", {"exchange_id": "binance"}, format="json")

    assert response.status_code == 400
    assert "A connector for exchange 'binance' already exists" in str(response.data["exchange_id"])


@pytest.mark.parametrize("options", ["not an object", [1, 2], 3])
def test_options_that_are_not_a_json_object_are_a_400(api_client, db, options) -> None:
    response = api_client.post("/api/v1/connectors/", {"exchange_id": "binance", "options": options}, format="json")

    assert response.status_code == 400
    assert "options must be a JSON object" in str(response.data["options"])


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"timeout": "1\x00"}, "options.timeout"),
        ({"urls": {"api": ["https://a", "b\x00"]}}, "options.urls.api[1]"),
        ({"a\x00": 1}, "options.'a\\x00'"),
    ],
)
def test_nul_characters_in_options_are_a_400_naming_where(api_client, db, options, path) -> None:
    # PostgreSQL's jsonb cannot store NUL, in a key or a text: refused before the insert fails.
    response = api_client.post("/api/v1/connectors/", {"exchange_id": "binance", "options": options}, format="json")

    assert response.status_code == 400
    assert f"NUL characters (\\u0000), the database cannot store them: {path}." in " ".join(response.data["options"])


def test_a_nul_character_in_a_search_is_a_400_naming_search(api_client, binance) -> None:
    response = api_client.get("/api/v1/connectors/", {"search": "bin\x00"})

    assert response.status_code == 400
    assert list(response.data) == ["search"]


def test_credentials_in_options_are_refused(api_client, db) -> None:
    response = api_client.post(
        "/api/v1/connectors/", {"exchange_id": "binance", "options": {"apiKey": "abc", "secret": "s"}}, format="json"
    )

    assert response.status_code == 400
    assert "must not hold credentials: options.apiKey, options.secret." in str(response.data["options"])


@pytest.mark.parametrize("field", ["rate_limit_weight_per_minute", "rate_limit_burst"])
@pytest.mark.parametrize("value", [0, -5])
def test_rate_limits_must_be_positive(api_client, db, field, value) -> None:
    response = api_client.post("/api/v1/connectors/", {"exchange_id": "binance", field: value}, format="json")

    assert response.status_code == 400
    assert "positive integer" in str(response.data[field])


def test_env_variable_fields_take_names_not_keys(api_client, db) -> None:
    response = api_client.post(
        "/api/v1/connectors/", {"exchange_id": "binance", "api_secret_env": "sk-live 123/abc"}, format="json"
    )

    assert response.status_code == 400
    assert "NAME of an environment variable" in str(response.data["api_secret_env"])


def test_exchange_id_cannot_change_after_creation(api_client, binance) -> None:
    response = api_client.patch(f"/api/v1/connectors/{binance.pk}/", {"exchange_id": "kraken"}, format="json")

    assert response.status_code == 400
    assert "cannot be changed" in str(response.data["exchange_id"])


def test_connector_can_be_renamed_and_disabled(api_client, binance) -> None:
    response = api_client.patch(f"/api/v1/connectors/{binance.pk}/", {"name": "Main", "enabled": False}, format="json")

    assert response.status_code == 200, response.data
    binance.refresh_from_db()
    assert (binance.name, binance.enabled) == ("Main", False)


def test_stop_pauses_every_job_and_start_activates_them(api_client, simulated) -> None:
    Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m")
    Job.objects.create(connector=simulated, symbol="ETH/USDT", timeframe="1m", status=Job.Status.ERROR)

    stopped = api_client.post(f"/api/v1/connectors/{simulated.pk}/stop/")
    assert stopped.status_code == 200
    assert stopped.data["jobs_changed"] == 2
    assert set(Job.objects.values_list("status", flat=True)) == {"paused"}

    Connector.objects.filter(pk=simulated.pk).update(enabled=False)
    started = api_client.post(f"/api/v1/connectors/{simulated.pk}/start")
    assert started.status_code == 200
    assert started.data["enabled"] is True
    assert started.data["job_count"] == 2
    assert set(Job.objects.values_list("status", flat=True)) == {"active"}


def test_connectors_are_filtered_by_exchange_and_enabled(api_client, simulated, binance) -> None:
    Connector.objects.filter(pk=binance.pk).update(enabled=False)

    enabled = api_client.get("/api/v1/connectors/?enabled=true").data["results"]
    by_id = api_client.get("/api/v1/connectors/?exchange_id=binance").data["results"]

    assert [c["exchange_id"] for c in enabled] == ["simulated"]
    assert [c["exchange_id"] for c in by_id] == ["binance"]


def test_deleting_a_connector_deletes_its_jobs(api_client, job, simulated) -> None:
    assert api_client.delete(f"/api/v1/connectors/{simulated.pk}/").status_code == 204
    assert not Job.objects.exists()


def test_exchange_list_names_every_accepted_id_and_the_configured_ones(api_client, binance) -> None:
    response = api_client.get("/api/v1/exchanges")

    assert response.status_code == 200
    assert {"simulated", "binance", "kraken"} <= set(response.data["exchanges"])
    assert response.data["count"] == len(response.data["exchanges"])
    assert response.data["configured"] == ["binance"]


def test_exchange_detail_lists_its_timeframes(api_client, binance) -> None:
    response = api_client.get("/api/v1/exchanges?exchange_id=binance")

    assert response.status_code == 200
    assert "1m" in response.data["timeframes"]
    assert response.data["timeframes_known"] is True
    assert response.data["connector"] == binance.pk


def test_exchange_detail_of_an_unknown_id_is_a_400(api_client, db) -> None:
    response = api_client.get("/api/v1/exchanges/?exchange_id=nope")

    assert response.status_code == 400
    assert "Unknown exchange id 'nope'" in str(response.data["exchange_id"])


def test_a_connector_created_concurrently_is_a_400_not_a_500(binance) -> None:
    from rest_framework.exceptions import ValidationError

    from apps.connectors.serializers import ConnectorSerializer

    with pytest.raises(ValidationError, match="already exists"):
        ConnectorSerializer().create({"exchange_id": "binance"})
