"""GET /api/v1/indicators, GET/PUT/DELETE /api/v1/indicators/config and POST /api/v1/indicators/compute."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from apps.jobs.models import Task
from apps.jobs.tasks import run_task
from apps.marketdata import store
from apps.marketdata.indicators import configured_indicators, indicator_set, update_indicators
from datacollector.config import MacdConfig, get_config
from tests.conftest import grant
from tests.marketdata.test_recompute_indicators import T0, put_series

SHORT = {"rsi": [3], "ema": [4], "sma": [3], "macd": [{"fast": 2, "slow": 4, "signal": 2}], "bollinger": []}


@pytest.fixture(autouse=True)
def _sql(sql_store):
    return sql_store


def test_the_list_describes_each_configured_indicator_with_columns_and_warmup(api_client):
    body = api_client.get("/api/v1/indicators").json()

    assert body["source"] == "collector.yaml"
    assert body["count"] == 1 + 3 + 3 + 1 + 1  # rsi, ema x3, sma x3, macd, bollinger
    assert body["columns"] == indicator_set().names
    assert body["warmup"] == indicator_set().warmup
    by_name = {(entry["indicator"], tuple(sorted(entry["params"].items()))): entry for entry in body["indicators"]}
    assert by_name[("sma", (("period", 20),))] == {
        "indicator": "sma",
        "params": {"period": 20},
        "columns": ["sma_20"],
        "warmup": 19,
    }
    macd = by_name[("macd", (("fast", 12), ("signal", 9), ("slow", 26)))]
    assert macd["columns"] == ["macd", "macd_signal", "macd_hist"]
    assert macd["warmup"] == 420
    assert by_name[("ema", (("period", 50),))]["warmup"] == 683


def test_put_stores_a_set_that_collection_then_uses_and_delete_goes_back_to_the_yaml(api_client):
    put_series("BTC/USDT", "1m", 40)

    response = api_client.put("/api/v1/indicators/config", SHORT, format="json")

    assert response.status_code == 200, response.json()
    assert response.json()["source"] == "database"
    assert response.json()["updated_by"] == "operator"
    assert response.json()["config"] == {**SHORT, "macd": [{"fast": 2, "slow": 4, "signal": 2}]}
    assert configured_indicators().macd == (MacdConfig(2, 4, 2),)
    assert api_client.get("/api/v1/indicators/config").json()["config"]["ema"] == [4]
    # What collection runs after storing candles: the stored set, not collector.yaml's.
    update_indicators("simulated", "BTC/USDT", "1m", T0)
    rows = store.read_indicators("simulated", "BTC/USDT", "1m")
    assert set(rows[-1][1]) == {"rsi_3", "ema_4", "sma_3", "macd_2_4_2", "macd_signal_2_4_2", "macd_hist_2_4_2"}

    assert api_client.delete("/api/v1/indicators/config").status_code == 204
    assert configured_indicators() == get_config().indicators
    assert api_client.get("/api/v1/indicators/config").json()["source"] == "collector.yaml"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"rsi": [0]}, "rsi", "indicators.rsi[0]: must be greater than 0, got 0"),
        ({"sma": [20, 10**20]}, "sma", "indicators.sma[1]: must be at most 10000, got 100000000000000000000"),
        (
            {"bollinger": [{"period": 20, "std": 1e300}]},
            "bollinger",
            "indicators.bollinger[0].std: must be at most 100",
        ),
        ({"ema": "12"}, "ema", "indicators.ema: expected a list of integers, got '12'"),
        (
            {"macd": [{"fast": 26, "slow": 12, "signal": 9}]},
            "macd",
            "indicators.macd: fast (26) must be less than slow",
        ),
        (
            {"bollinger": [{"period": 20, "std": -1}]},
            "bollinger",
            "indicators.bollinger[0].std: must be greater than 0",
        ),
        ({"stoch": [14]}, "stoch", "indicators.stoch: unknown key; accepted keys are rsi, ema, sma, macd, bollinger"),
        ([14], "non_field_errors", "indicators: expected a mapping with keys rsi, ema, sma, macd, bollinger"),
    ],
)
def test_put_refuses_what_the_yaml_refuses_naming_the_key(api_client, body, field, message):
    response = api_client.put("/api/v1/indicators/config", body, format="json")
    assert response.status_code == 400
    assert message in response.json()[field][0]
    assert api_client.get("/api/v1/indicators/config").json()["source"] == "collector.yaml"


def test_reading_needs_view_and_changing_needs_change_permission(db):
    reader = APIClient()
    reader.force_authenticate(grant(get_user_model().objects.create_user("reader"), "view_indicatorconfig"))
    assert reader.get("/api/v1/indicators/config").status_code == 200
    assert reader.put("/api/v1/indicators/config", SHORT, format="json").status_code == 403
    assert reader.delete("/api/v1/indicators/config").status_code == 403
    assert reader.post("/api/v1/indicators/compute", {"exchange_id": "simulated"}, format="json").status_code == 403


def test_compute_queues_a_task_that_rebuilds_the_selected_series_and_is_polled(api_client, user):
    put_series("BTC/USDT", "1m", 40)
    put_series("ETH/USDT", "1h", 30)
    api_client.put("/api/v1/indicators/config", SHORT, format="json")

    response = api_client.post(
        "/api/v1/indicators/compute", {"exchange_id": "simulated", "timeframes": ["1m"]}, format="json"
    )

    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["series"] == 1
    assert body["url"].endswith(f"/api/v1/tasks/{body['task']}")
    task = Task.objects.get(pk=body["task"])
    assert (task.kind, task.params, task.created_by) == (
        Task.Kind.INDICATORS,
        {"exchange_id": "simulated", "symbols": [], "timeframes": ["1m"]},
        user,
    )
    assert api_client.get(body["url"]).json()["status"] == "pending"

    assert run_task(Task.objects.claim("worker-1", lease_seconds=60)) == Task.Status.SUCCEEDED

    polled = api_client.get(body["url"]).json()
    assert polled["status"] == "succeeded"
    assert polled["result"]["series"] == 1
    assert polled["result"]["rows"] == 40
    assert polled["result"]["columns"][0] == "sma_3"
    assert store.read_indicators("simulated", "ETH/USDT", "1h") == []  # not selected
    assert set(store.read_indicators("simulated", "BTC/USDT", "1m")[-1][1]) >= {"sma_3", "ema_4"}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"exchange_id": "nope"}, "exchange_id", "'nope' is not a ccxt exchange id"),
        ({"exchange_id": "binance"}, "exchange_id", "'binance' has no stored candles"),
        (
            {"exchange_id": "simulated", "symbols": ["DOGE/USDT"]},
            "symbols",
            "DOGE/USDT: no stored candles on simulated",
        ),
        ({"exchange_id": "simulated", "timeframes": ["fast"]}, "timeframes", "fast: Timeframe 'fast' is not well"),
        (
            {"exchange_id": "simulated", "symbols": ["ETH/USDT"], "timeframes": ["1m"]},
            "non_field_errors",
            "symbols and timeframes select no stored series on simulated",
        ),
        ({}, "exchange_id", "This field is required."),
    ],
)
def test_compute_refuses_a_selection_of_nothing_stored_naming_the_field(api_client, body, field, message):
    put_series("BTC/USDT", "1m", 5)
    put_series("ETH/USDT", "1h", 5)
    response = api_client.post("/api/v1/indicators/compute", body, format="json")
    assert response.status_code == 400
    assert message in response.json()[field][0]
    assert not Task.objects.exists()


def test_a_task_is_seen_by_its_creator_and_staff_only(api_client, admin_client, user):
    task = Task.objects.enqueue(Task.Kind.INDICATORS, {"exchange_id": "simulated"}, user)
    other = APIClient()
    other.force_authenticate(grant(get_user_model().objects.create_user("other"), "view_task"))
    assert api_client.get(f"/api/v1/tasks/{task.pk}").status_code == 200
    assert other.get(f"/api/v1/tasks/{task.pk}").status_code == 404
    assert admin_client.get(f"/api/v1/tasks/{task.pk}").status_code == 200
