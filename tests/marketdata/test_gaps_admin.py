"""The Gap admin: list, the refetch action, and the stored-series overview."""

import pytest
from django.urls import reverse

from apps.marketdata import gaps, store
from apps.marketdata.models import Gap

pytestmark = pytest.mark.django_db

MINUTE = 60_000
T0 = 1_704_067_200_000
SERIES = ("binance", "BTC/USDT", "1m")


@pytest.fixture
def confirmed_gap(sql_store) -> Gap:
    store.upsert_candles(*SERIES, [[T0 + i * MINUTE, 1.0, 1.0, 1.0, 1.0, 1.0] for i in (0, 1, 5)])
    [gap] = gaps.sync_gaps(*SERIES)
    Gap.objects.filter(pk=gap.pk).update(status=Gap.Status.CONFIRMED_EMPTY, attempts=3)
    return gap


def test_the_changelist_shows_gaps_in_utc(admin_client, confirmed_gap):
    response = admin_client.get(reverse("admin:marketdata_gap_changelist"), {"status": "confirmed_empty"})

    assert response.status_code == 200
    content = response.content.decode()
    assert "BTC/USDT" in content
    assert "Stored series" in content


def test_the_refetch_action_reopens_gaps(admin_client, confirmed_gap):
    response = admin_client.post(
        reverse("admin:marketdata_gap_changelist"),
        {"action": "refetch", "_selected_action": [confirmed_gap.pk]},
        follow=True,
    )

    assert response.status_code == 200
    confirmed_gap.refresh_from_db()
    assert (confirmed_gap.status, confirmed_gap.attempts) == (Gap.Status.OPEN, 0)
    assert [g.pk for g in gaps.gaps_to_refetch(*SERIES)] == [confirmed_gap.pk]


def test_the_series_overview_lists_coverage_and_gaps(admin_client, confirmed_gap):
    response = admin_client.get(reverse("admin:marketdata_series_overview"))

    assert response.status_code == 200
    [row] = response.context["rows"]
    assert (row["candles"], row["expected"], row["complete"]) == (3, 6, "50.00%")
    assert row["confirmed_empty"] == 3


def test_gaps_cannot_be_added_by_hand(admin_client, sql_store):
    assert admin_client.get(reverse("admin:marketdata_gap_add")).status_code == 403
