"""GET /api/v1/data/gaps (filters, status, pages) and POST /api/v1/data/gaps/{id}/refetch."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from apps.marketdata.models import Gap
from tests.conftest import grant

pytestmark = pytest.mark.django_db

T0 = 1_704_067_200_000
MINUTE = 60_000
URL = "/api/v1/data/gaps"


def gap(symbol: str = "BTC/USDT", start: int = 0, status: str = Gap.Status.OPEN, attempts: int = 0) -> Gap:
    return Gap.objects.create(
        exchange_id="binance",
        symbol=symbol,
        timeframe="1m",
        start_ts=T0 + start * MINUTE,
        end_ts=T0 + (start + 2) * MINUTE,
        missing=3,
        status=status,
        attempts=attempts,
    )


def client_with(*codenames: str) -> APIClient:
    client = APIClient()
    client.force_authenticate(grant(get_user_model().objects.create_user("someone"), *codenames))
    return client


def test_lists_gaps_with_filters_and_times(api_client):
    gap(start=0)
    gap(start=10, status=Gap.Status.CONFIRMED_EMPTY, attempts=3)
    gap(symbol="ETH/USDT")

    body = api_client.get(URL, {"symbol": "BTC/USDT", "status": "confirmed_empty"}).json()

    assert body["count"] == 1
    row = body["results"][0]
    assert (row["start_ts"], row["start_time"], row["end_time"]) == (
        T0 + 10 * MINUTE,
        "2024-01-01T00:10:00Z",
        "2024-01-01T00:12:00Z",
    )
    assert (row["missing"], row["status"], row["attempts"]) == (3, "confirmed_empty", 3)
    assert api_client.get(URL, {"exchange_id": "binance", "timeframe": "1m"}).json()["count"] == 3


def test_an_unknown_status_is_a_400_naming_it(api_client):
    response = api_client.get(URL, {"status": "closed"})
    assert response.status_code == 400
    assert "status" in response.json()


def test_refetch_reopens_the_gap_for_the_jobs_next_run(api_client):
    confirmed = gap(status=Gap.Status.CONFIRMED_EMPTY, attempts=3)

    response = api_client.post(f"{URL}/{confirmed.pk}/refetch")

    assert response.status_code == 200
    assert (response.json()["status"], response.json()["attempts"]) == ("open", 0)
    confirmed.refresh_from_db()
    assert (confirmed.status, confirmed.attempts) == (Gap.Status.OPEN, 0)


def test_refetch_needs_the_change_permission(db):
    target = gap(status=Gap.Status.CONFIRMED_EMPTY, attempts=3)
    viewer = client_with("view_gap")

    assert viewer.get(URL).status_code == 200
    assert viewer.post(f"{URL}/{target.pk}/refetch").status_code == 403
    target.refresh_from_db()
    assert target.status == Gap.Status.CONFIRMED_EMPTY
    assert APIClient().get(URL).status_code in (401, 403)


def test_refetch_of_an_unknown_gap_is_a_404(api_client):
    assert api_client.post(f"{URL}/999999/refetch").status_code == 404
