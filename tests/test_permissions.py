"""The API follows Django's model permissions, as the admin does: a user of each kind against every endpoint."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from apps.connectors.models import Connector
from apps.jobs.models import Job
from tests.conftest import grant

SERIES = {"exchange_id": "simulated", "symbol": "BTC/USDT", "timeframe": "1m"}

READ_PATHS = [
    "/api/v1/connectors/",
    "/api/v1/jobs/",
    "/api/v1/runs/",
    "/api/v1/ratelimits/",
    "/api/v1/exchanges",
    "/api/v1/data/ohlcv",
    "/api/v1/data/indicators",
]

# What each read needs; the plain views (exchanges, data) have no queryset and name theirs.
READ_PERMISSIONS = {
    "/api/v1/connectors/": "view_connector",
    "/api/v1/jobs/": "view_job",
    "/api/v1/runs/": "view_run",
    "/api/v1/ratelimits/": "view_ratelimit",
    "/api/v1/exchanges": "view_connector",
    "/api/v1/data/ohlcv": "view_candle",
    "/api/v1/data/indicators": "view_indicatorrow",
}

VIEW_ALL = [
    "view_connector",
    "view_job",
    "view_run",
    "view_ratelimit",
    "view_candle",
    "view_indicatorrow",
    "view_gap",
]


def client_for(username: str, *codenames: str, **flags: bool) -> APIClient:
    user = get_user_model().objects.create_user(username, password=None, **flags)
    if codenames:
        user = grant(user, *codenames)
    client = APIClient()
    client.force_authenticate(user)
    return client


def get(client: APIClient, path: str):
    return client.get(path, SERIES if path.startswith("/api/v1/data/") else None)


def actions(connector: Connector, job: Job) -> list[str]:
    return [
        f"/api/v1/connectors/{connector.pk}/start/",
        f"/api/v1/connectors/{connector.pk}/stop/",
        f"/api/v1/jobs/{job.pk}/pause/",
        f"/api/v1/jobs/{job.pk}/resume/",
        f"/api/v1/jobs/{job.pk}/run-now/",
    ]


@pytest.fixture
def nobody(db) -> APIClient:
    """Logged in, no permission at all."""
    return client_for("nobody")


@pytest.fixture
def reader(db) -> APIClient:
    """Read-only: only view_ permissions."""
    return client_for("reader", *VIEW_ALL)


@pytest.fixture
def operator(db) -> APIClient:
    """Views, adds and changes connectors and jobs, but deletes nothing."""
    return client_for("operator-no-delete", *VIEW_ALL, "add_connector", "change_connector", "add_job", "change_job")


@pytest.mark.parametrize("path", READ_PATHS)
def test_a_user_without_permissions_reads_nothing(nobody, path) -> None:
    assert get(nobody, path).status_code == 403


@pytest.mark.parametrize("path", READ_PATHS)
def test_each_read_needs_its_view_permission(db, path) -> None:
    assert get(client_for("one-perm", READ_PERMISSIONS[path]), path).status_code == 200


@pytest.mark.parametrize("path", READ_PATHS)
def test_a_read_only_user_reads_everything(reader, job, path) -> None:
    assert get(reader, path).status_code == 200


def test_a_read_only_user_reads_one_object_and_the_api_root(reader, job, simulated) -> None:
    assert reader.get("/api/v1/").status_code == 200
    assert reader.get(f"/api/v1/jobs/{job.pk}/").status_code == 200
    assert reader.get(f"/api/v1/connectors/{simulated.pk}/").status_code == 200
    assert reader.options("/api/v1/jobs/").status_code == 200


def test_a_read_only_user_changes_nothing(reader, job, simulated) -> None:
    responses = [
        reader.post("/api/v1/connectors/", {"exchange_id": "binance"}, format="json"),
        reader.post("/api/v1/jobs/", {**SERIES, "symbol": "ETH/USDT"}, format="json"),
        reader.post("/api/v1/jobs/bulk", {"exchange_id": "simulated", "symbols": ["SOL/USDT"], "timeframes": ["1m"]}),
        reader.patch(f"/api/v1/jobs/{job.pk}/", {"status": "paused"}, format="json"),
        reader.patch(f"/api/v1/connectors/{simulated.pk}/", {"name": "Renamed"}, format="json"),
        reader.delete(f"/api/v1/jobs/{job.pk}/"),
        reader.delete(f"/api/v1/connectors/{simulated.pk}/"),
        *(reader.post(path) for path in actions(simulated, job)),
    ]

    assert [response.status_code for response in responses] == [403] * len(responses)
    job.refresh_from_db()
    simulated.refresh_from_db()
    assert (job.status, simulated.name) == (Job.Status.ACTIVE, "Simulated")
    assert Connector.objects.count() == 1
    assert Job.objects.count() == 1


def test_an_operator_adds_changes_and_acts_but_deletes_nothing(operator, job, simulated) -> None:
    assert operator.post("/api/v1/connectors/", {"exchange_id": "binance"}, format="json").status_code == 201
    assert operator.post("/api/v1/jobs/", {**SERIES, "symbol": "ETH/USDT"}, format="json").status_code == 201
    bulk = {"exchange_id": "simulated", "symbols": ["SOL/USDT"], "timeframes": ["1m", "5m"]}
    assert operator.post("/api/v1/jobs/bulk", bulk, format="json").status_code == 201
    assert operator.patch(f"/api/v1/jobs/{job.pk}/", {"status": "paused"}, format="json").status_code == 200
    for path in actions(simulated, job):
        assert operator.post(path).status_code == 200, path

    assert operator.delete(f"/api/v1/jobs/{job.pk}/").status_code == 403
    assert operator.delete(f"/api/v1/connectors/{simulated.pk}/").status_code == 403
    assert Job.objects.filter(pk=job.pk).exists()


def test_an_action_on_an_object_needs_change_not_add(db, job, simulated) -> None:
    adder = client_for("adder", "view_connector", "view_job", "add_connector", "add_job")

    for path in actions(simulated, job):
        assert adder.post(path).status_code == 403, path
    job.refresh_from_db()
    assert job.status == Job.Status.ACTIVE


def test_bulk_creation_needs_add_job(db, simulated) -> None:
    changer = client_for("changer", "view_job", "change_job")
    bulk = {"exchange_id": "simulated", "symbols": ["SOL/USDT"], "timeframes": ["1m"]}

    assert changer.post("/api/v1/jobs/bulk", bulk, format="json").status_code == 403
    assert client_for("adder", "view_job", "add_job").post("/api/v1/jobs/bulk", bulk, format="json").status_code == 201


def test_deleting_needs_the_delete_permission(db, job) -> None:
    deleter = client_for("deleter", "view_job", "delete_job")

    assert deleter.delete(f"/api/v1/jobs/{job.pk}/").status_code == 204
    assert not Job.objects.exists()


def test_staff_status_alone_grants_nothing_in_the_api(db, job) -> None:
    staff = client_for("staff-only", is_staff=True)

    assert staff.get("/api/v1/jobs/").status_code == 403
    assert staff.post(f"/api/v1/jobs/{job.pk}/pause/").status_code == 403


def test_a_superuser_may_do_everything(db, job, simulated) -> None:
    root = client_for("root", is_staff=True, is_superuser=True)

    for path in READ_PATHS:
        assert get(root, path).status_code == 200, path
    for path in actions(simulated, job):
        assert root.post(path).status_code == 200, path
    assert root.delete(f"/api/v1/connectors/{simulated.pk}/").status_code == 204
    assert not Job.objects.exists()


def test_the_default_user_fixture_holds_every_model_permission_but_is_not_staff(user) -> None:
    assert not user.is_staff
    assert user.has_perms([f"{app}.view_{model}" for app, model in [("jobs", "job"), ("connectors", "connector")]])


@pytest.mark.parametrize("path", ["/api/v1/jobs/", "/api/v1/exchanges", "/api/v1/data/ohlcv"])
def test_anonymous_requests_stay_refused(anon_client, db, path) -> None:
    assert get(anon_client, path).status_code in (401, 403)
