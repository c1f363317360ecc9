from datetime import UTC, datetime

import pytest
import time_machine
from django.utils import timezone

from apps.jobs.models import Job, Run

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def create(api_client, **data):
    return api_client.post("/api/v1/jobs/", {"exchange_id": "simulated", **data}, format="json")


def test_job_is_created_from_exchange_symbol_and_timeframe_and_shows_its_state(api_client, simulated) -> None:
    response = create(api_client, symbol="BTC/USDT", timeframe="1m")

    assert response.status_code == 201, response.data
    body = response.data
    assert body["exchange_id"] == "simulated"
    assert body["symbol"] == "BTC/USDT"
    assert body["timeframe"] == "1m"
    assert body["status"] == "active"
    assert body["since"] is None
    for field in (
        "cursor",
        "cursor_at",
        "next_run_at",
        "lease_owner",
        "lease_expires_at",
        "last_error",
        "consecutive_failures",
        "last_run_at",
        "last_success_at",
        "created_at",
        "updated_at",
    ):
        assert field in body
    assert Job.objects.get(pk=body["id"]).connector == simulated


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ("2024-01-01T00:00:00Z", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01T02:00:00+02:00", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01T00:00:00", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01", datetime(2024, 1, 1, tzinfo=UTC)),
        (1704067200000, datetime(2024, 1, 1, tzinfo=UTC)),
        ("1704067200000", datetime(2024, 1, 1, tzinfo=UTC)),
    ],
)
def test_since_accepts_iso_8601_and_epoch_milliseconds(api_client, simulated, since, expected) -> None:
    response = create(api_client, symbol="BTC/USDT", timeframe="1h", since=since)

    assert response.status_code == 201, response.data
    assert Job.objects.get(pk=response.data["id"]).since == expected


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize(
    ("since", "message"),
    [
        ("yesterday", "ISO 8601"),
        (1704067200, "looks like epoch seconds"),
        ("2030-01-01T00:00:00Z", "future"),
        (True, "ISO 8601"),
    ],
)
def test_bad_since_is_a_400_saying_what_is_accepted(api_client, simulated, since, message) -> None:
    response = create(api_client, symbol="BTC/USDT", timeframe="1h", since=since)

    assert response.status_code == 400
    assert message in str(response.data["since"])


def test_unknown_exchange_is_a_400_pointing_to_the_exchange_list(api_client, db) -> None:
    response = api_client.post(
        "/api/v1/jobs/", {"exchange_id": "nosuchexchange", "symbol": "BTC/USDT", "timeframe": "1m"}, format="json"
    )

    assert response.status_code == 400
    message = str(response.data["exchange_id"])
    assert "nosuchexchange" in message
    assert "/api/v1/exchanges" in message


def test_known_exchange_without_a_connector_is_a_400_saying_to_create_one(api_client, db) -> None:
    response = api_client.post(
        "/api/v1/jobs/", {"exchange_id": "kraken", "symbol": "BTC/USD", "timeframe": "1m"}, format="json"
    )

    assert response.status_code == 400
    message = str(response.data["exchange_id"])
    assert "No connector is configured for exchange 'kraken'" in message
    assert "create one" in message


def test_timeframe_the_exchange_does_not_offer_is_a_400_listing_the_ones_it_does(api_client, binance) -> None:
    response = api_client.post(
        "/api/v1/jobs/", {"exchange_id": "binance", "symbol": "BTC/USDT", "timeframe": "2m"}, format="json"
    )

    assert response.status_code == 400
    message = str(response.data["timeframe"])
    assert "'2m' is not offered by binance" in message
    assert "1m, 3m, 5m" in message


def test_any_well_formed_timeframe_is_accepted_where_ccxt_lists_none_offline(api_client) -> None:
    from apps.connectors.exchanges import offline_timeframes
    from apps.connectors.models import Connector

    assert offline_timeframes("bitflyer") == ()
    Connector.objects.create(exchange_id="bitflyer")

    ok = api_client.post(
        "/api/v1/jobs/", {"exchange_id": "bitflyer", "symbol": "BTC/JPY", "timeframe": "7m"}, format="json"
    )
    bad = api_client.post(
        "/api/v1/jobs/", {"exchange_id": "bitflyer", "symbol": "BTC/JPY", "timeframe": "m7"}, format="json"
    )

    assert ok.status_code == 201, ok.data
    assert bad.status_code == 400
    assert "not well formed" in str(bad.data["timeframe"])


@pytest.mark.parametrize("symbol", ["BTCUSDT", "BTC-USDT", "BTC/", "/USDT", "BTC/USDT/EUR", "BTC / USDT", "BTC/USDT:"])
def test_symbol_that_is_not_base_slash_quote_is_a_400(api_client, simulated, symbol) -> None:
    response = create(api_client, symbol=symbol, timeframe="1m")

    assert response.status_code == 400
    assert "BASE/QUOTE" in str(response.data["symbol"])


@pytest.mark.parametrize("symbol", ["ETH/BTC", "BTC/USDT:USDT", "BTC/USD:BTC-250328", "1000PEPE/USDT"])
def test_unified_spot_and_derivative_symbols_are_accepted(api_client, simulated, symbol) -> None:
    assert create(api_client, symbol=symbol, timeframe="1m").status_code == 201


def test_duplicate_job_is_a_400_naming_the_series(api_client, job) -> None:
    response = create(api_client, symbol="BTC/USDT", timeframe="1m")

    assert response.status_code == 400
    assert "A job for simulated BTC/USDT 1m already exists" in str(response.data["non_field_errors"])
    assert Job.objects.count() == 1


def test_status_error_cannot_be_set_by_the_operator(api_client, simulated) -> None:
    response = create(api_client, symbol="BTC/USDT", timeframe="1m", status="error")

    assert response.status_code == 400
    assert "status" in response.data


def test_missing_fields_are_a_400_naming_each(api_client, db) -> None:
    response = api_client.post("/api/v1/jobs/", {}, format="json")

    assert response.status_code == 400
    assert {"exchange_id", "symbol", "timeframe"} <= set(response.data)


@pytest.mark.parametrize(("field", "value"), [("symbol", "ETH/USDT"), ("timeframe", "1h"), ("exchange_id", "binance")])
def test_changing_the_series_of_a_job_is_refused(api_client, job, binance, field, value) -> None:
    response = api_client.patch(f"/api/v1/jobs/{job.pk}/", {field: value}, format="json")

    assert response.status_code == 400
    assert "cannot be changed" in str(response.data[field])
    job.refresh_from_db()
    assert (job.connector.exchange_id, job.symbol, job.timeframe) == ("simulated", "BTC/USDT", "1m")


def test_put_with_the_same_series_updates_since_and_status(api_client, job) -> None:
    response = api_client.put(
        f"/api/v1/jobs/{job.pk}/",
        {
            "exchange_id": "simulated",
            "symbol": "BTC/USDT",
            "timeframe": "1m",
            "since": "2024-01-01",
            "status": "paused",
        },
        format="json",
    )

    assert response.status_code == 200, response.data
    job.refresh_from_db()
    assert job.status == Job.Status.PAUSED
    assert job.since == datetime(2024, 1, 1, tzinfo=UTC)


def test_patching_status_to_active_resumes_and_clears_the_error(api_client, job) -> None:
    Job.objects.filter(pk=job.pk).update(status=Job.Status.ERROR, last_error="boom", consecutive_failures=3)

    response = api_client.patch(f"/api/v1/jobs/{job.pk}/", {"status": "active"}, format="json")

    assert response.status_code == 200
    job.refresh_from_db()
    assert (job.status, job.last_error, job.consecutive_failures) == ("active", "", 0)


def test_pause_resume_and_run_now_actions(api_client, job) -> None:
    far = timezone.now() + timezone.timedelta(hours=1)
    Job.objects.filter(pk=job.pk).update(next_run_at=far, last_error="boom", consecutive_failures=2)

    paused = api_client.post(f"/api/v1/jobs/{job.pk}/pause/")
    assert paused.status_code == 200
    assert paused.data["status"] == "paused"

    resumed = api_client.post(f"/api/v1/jobs/{job.pk}/resume/")
    assert resumed.status_code == 200
    assert resumed.data["status"] == "active"
    assert resumed.data["last_error"] == ""

    Job.objects.filter(pk=job.pk).update(next_run_at=far)
    ran = api_client.post(f"/api/v1/jobs/{job.pk}/run-now")
    assert ran.status_code == 200
    job.refresh_from_db()
    assert job.next_run_at <= timezone.now()
    assert Job.objects.due().filter(pk=job.pk).exists()


def test_jobs_are_filtered_by_status_exchange_symbol_and_timeframe(api_client, simulated, binance) -> None:
    Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m")
    Job.objects.create(connector=simulated, symbol="ETH/USDT", timeframe="1h", status=Job.Status.PAUSED)
    Job.objects.create(connector=binance, symbol="BTC/USDT", timeframe="1h")

    def ids(query: str) -> set[tuple[str, str, str]]:
        response = api_client.get(f"/api/v1/jobs/?{query}")
        assert response.status_code == 200
        return {(j["exchange_id"], j["symbol"], j["timeframe"]) for j in response.data["results"]}

    assert ids("status=paused") == {("simulated", "ETH/USDT", "1h")}
    assert ids("exchange_id=binance") == {("binance", "BTC/USDT", "1h")}
    assert ids("symbol=BTC/USDT&timeframe=1h") == {("binance", "BTC/USDT", "1h")}
    assert len(ids("")) == 3
    ordered = api_client.get("/api/v1/jobs/?ordering=-symbol").data["results"]
    assert ordered[0]["symbol"] == "ETH/USDT"


def test_bulk_creates_every_symbol_and_timeframe(api_client, simulated) -> None:
    response = api_client.post(
        "/api/v1/jobs/bulk",
        {
            "exchange_id": "simulated",
            "symbols": ["BTC/USDT", "ETH/USDT"],
            "timeframes": ["1m", "1h"],
            "status": "paused",
        },
        format="json",
    )

    assert response.status_code == 201, response.data
    assert len(response.data) == 4
    assert set(Job.objects.values_list("symbol", "timeframe", "status")) == {
        ("BTC/USDT", "1m", "paused"),
        ("BTC/USDT", "1h", "paused"),
        ("ETH/USDT", "1m", "paused"),
        ("ETH/USDT", "1h", "paused"),
    }


def test_bulk_with_one_existing_job_creates_nothing_and_names_the_duplicate(api_client, job) -> None:
    response = api_client.post(
        "/api/v1/jobs/bulk/",
        {"exchange_id": "simulated", "symbols": ["ETH/USDT", "BTC/USDT"], "timeframes": ["1m", "5m"]},
        format="json",
    )

    assert response.status_code == 400
    assert "simulated BTC/USDT 1m" in str(response.data["non_field_errors"])
    assert Job.objects.count() == 1


def test_bulk_with_one_bad_symbol_or_timeframe_creates_nothing(api_client, simulated) -> None:
    response = api_client.post(
        "/api/v1/jobs/bulk",
        {"exchange_id": "simulated", "symbols": ["BTC/USDT", "ETHUSDT"], "timeframes": ["1m", "2m", "1m"]},
        format="json",
    )

    assert response.status_code == 400
    assert "'ETHUSDT'" in str(response.data["symbols"])
    assert "'2m' is not offered by simulated" in str(response.data["timeframes"])
    assert "'1m' is listed twice" in str(response.data["timeframes"])
    assert not Job.objects.exists()


def test_bulk_for_an_exchange_without_connector_is_a_400(api_client, db) -> None:
    response = api_client.post(
        "/api/v1/jobs/bulk", {"exchange_id": "kraken", "symbols": ["BTC/USD"], "timeframes": ["1m"]}, format="json"
    )

    assert response.status_code == 400
    assert "No connector" in str(response.data["exchange_id"])


def test_runs_are_read_only_and_filtered_by_job(api_client, job, simulated) -> None:
    other = Job.objects.create(connector=simulated, symbol="ETH/USDT", timeframe="1m")
    Run.objects.create(job=job, worker="w1", status=Run.Status.SUCCESS, candles_written=5)
    Run.objects.create(job=other, worker="w1")

    response = api_client.get(f"/api/v1/runs/?job={job.pk}")

    assert response.status_code == 200
    assert [r["candles_written"] for r in response.data["results"]] == [5]
    assert response.data["results"][0]["symbol"] == "BTC/USDT"
    assert api_client.post("/api/v1/runs/", {"job": job.pk}).status_code == 405
    run_id = response.data["results"][0]["id"]
    assert api_client.delete(f"/api/v1/runs/{run_id}/").status_code == 405


@pytest.mark.parametrize("name", ["started_after", "started_before"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-01-01T00:00:00+16:00", "+16:00 is out of range"),
        ("2026-01-01T00:00:00-23:59", "-23:59 is out of range"),
        ("2026-01-01T00:00:00 02:00", "%2B"),
        ("yesterday", "ISO 8601"),
        ("2026-01-\x0001", "ISO 8601"),
    ],
)
def test_run_time_filters_refuse_what_the_database_cannot_compare_with_a_400(api_client, job, name, value, message):
    # PostgreSQL refuses UTC offsets of 16 hours or more; the filter says so instead of a 500.
    Run.objects.create(job=job, worker="w1")

    response = api_client.get("/api/v1/runs/", {name: value})

    assert response.status_code == 400
    assert list(response.data) == [name]
    assert message in " ".join(response.data[name])


def test_run_time_filters_take_offsets_up_to_15_59_and_compare_in_utc(api_client, job) -> None:
    Run.objects.create(job=job, worker="w1", started_at=datetime(2026, 1, 1, 12, tzinfo=UTC))

    after = api_client.get("/api/v1/runs/", {"started_after": "2026-01-01T23:59:00+15:59"})
    before = api_client.get("/api/v1/runs/", {"started_before": "2026-01-01T12:00:00+00:01"})

    assert after.status_code == before.status_code == 200
    assert after.data["count"] == 1
    assert before.data["count"] == 0


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/api/v1/runs/", "job"),
        ("/api/v1/jobs/", "connector"),
    ],
)
@pytest.mark.parametrize("value", ["99999999999999999999", "-99999999999999999999", "1.5", "\x00"])
def test_id_filters_beyond_bigint_or_not_integers_are_a_400(api_client, job, url, name, value) -> None:
    response = api_client.get(url, {name: value})

    assert response.status_code == 400
    assert list(response.data) == [name]


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/api/v1/jobs/", "symbol"),
        ("/api/v1/jobs/", "exchange_id"),
        ("/api/v1/runs/", "worker"),
        ("/api/v1/runs/", "symbol"),
        ("/api/v1/jobs/", "search"),
    ],
)
def test_nul_characters_in_text_filters_are_a_400_naming_the_parameter(api_client, job, url, name) -> None:
    # PostgreSQL text cannot hold NUL; the filters refuse it before a query is built.
    response = api_client.get(url, {name: "BTC\x00"})

    assert response.status_code == 400
    assert list(response.data) == [name]


def test_pages_beyond_any_count_are_a_404(api_client, job) -> None:
    response = api_client.get("/api/v1/jobs/", {"page": "99999999999999999999999"})

    assert response.status_code == 404
    assert response.data == {"detail": "Invalid page."}


@pytest.mark.parametrize("path", ["/api/v1/jobs/1.5e-3/", "/api/v1/jobs/a%2Fb/", "/api/v1/runs/-1/pause/"])
def test_an_api_url_that_matches_no_route_is_a_json_404(api_client, job, path) -> None:
    response = api_client.get(path)

    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


def test_the_schema_documents_bulk_as_a_plain_list_without_list_filters(api_client, db) -> None:
    schema = api_client.get("/api/schema/", {"format": "json"}).json()

    bulk = schema["paths"]["/api/v1/jobs/bulk/"]["post"]
    assert bulk["responses"]["201"]["content"]["application/json"]["schema"]["type"] == "array"
    assert "parameters" not in bulk
    duration = schema["components"]["schemas"]["Run"]["properties"]["duration"]
    assert duration["nullable"] is True


def test_a_running_run_has_a_null_duration(api_client, job) -> None:
    Run.objects.create(job=job, worker="w1")

    response = api_client.get("/api/v1/runs/")

    assert response.data["results"][0]["duration"] is None


def test_deleting_a_job_removes_it(api_client, job) -> None:
    assert api_client.delete(f"/api/v1/jobs/{job.pk}/").status_code == 204
    assert not Job.objects.exists()


def test_a_job_created_concurrently_is_a_400_not_a_500(job, simulated) -> None:
    # The race: validation saw no duplicate, then another request inserted the same series.
    from rest_framework.exceptions import ValidationError

    from apps.jobs.serializers import JobSerializer

    with pytest.raises(ValidationError, match="already exists"):
        JobSerializer().create({"connector": simulated, "symbol": "BTC/USDT", "timeframe": "1m"})
    assert Job.objects.count() == 1


def test_bulk_that_loses_a_race_creates_nothing(job, simulated) -> None:
    from rest_framework.exceptions import ValidationError

    from apps.jobs.serializers import BulkJobSerializer

    data = {"connector": simulated, "symbols": ["ETH/USDT", "BTC/USDT"], "timeframes": ["1m"], "status": "active"}
    with pytest.raises(ValidationError, match="nothing was created"):
        BulkJobSerializer().create(data)
    assert list(Job.objects.values_list("symbol", flat=True)) == ["BTC/USDT"]
