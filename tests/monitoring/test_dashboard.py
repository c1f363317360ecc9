"""The operator's dashboard on the admin index: the fleet at a glance, first painted from the database."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from apps.connectors.models import Connector
from apps.jobs.models import Job, Run
from apps.marketdata.models import Gap
from apps.ratelimits.models import RateLimit, Rejection
from tests.conftest import grant

INDEX = reverse("admin:index")


@pytest.fixture
def fleet(db):
    connector = Connector.objects.create(exchange_id="binance")
    now = timezone.now()
    fresh = Job.objects.create(connector=connector, symbol="BTC/USDT", timeframe="1m", cursor=1_704_067_200_000)
    failing = Job.objects.create(
        connector=connector,
        symbol="ETH/USDT",
        timeframe="1m",
        status=Job.Status.ERROR,
        consecutive_failures=3,
        last_error="BadSymbol: binance does not have market symbol ETH/USDT",
    )
    overdue = Job.objects.create(
        connector=connector, symbol="SOL/USDT", timeframe="1h", next_run_at=now - timedelta(hours=1)
    )
    Run.objects.create(job=fresh, worker="host:1/0")
    # The connector made its bucket; a quarter full now, and the exchange asked us to back off.
    RateLimit.objects.filter(exchange_id="binance").update(
        capacity=100, refill_per_second=0.001, tokens=25, updated_at=now, blocked_until=now + timedelta(minutes=5)
    )
    Gap.objects.create(exchange_id="binance", symbol="BTC/USDT", timeframe="1m", start_ts=0, end_ts=120_000, missing=3)
    return fresh, failing, overdue


def test_index_shows_the_fleet_at_a_glance_with_links(admin_client, fleet) -> None:
    _fresh, failing, _overdue = fleet

    content = admin_client.get(INDEX).content.decode()

    assert 'id="jobs-active" data-count="2"' in content
    assert 'id="jobs-error" data-count="1"' in content
    assert "BadSymbol: binance does not have market symbol ETH/USDT" in content  # failing, with its last error
    assert "binance SOL/USDT 1h" in content
    assert "no worker holds it" in content
    assert 'id="in-flight-count">1<' in content
    assert "host:1/0" in content
    assert 'data-exchange="binance"' in content
    assert "width: 25%" in content
    assert 'class="error">until' in content  # back-off
    assert 'id="gaps-total">1<' in content
    assert "2024-01-01 00:00" in content  # the freshest series' newest candle
    assert "Stored series and charts" in content
    assert reverse("admin:marketdata_series_overview") in content
    assert reverse("admin:jobs_job_change", args=[failing.pk]) in content
    assert "monitoring/dashboard.js" in content
    assert 'id="fleet-state"' in content
    assert "Connectors" in content  # the usual app list follows


def test_the_429_count_starts_from_the_last_hours_rejections(admin_client, fleet) -> None:
    now = timezone.now()
    for minutes in (5, 50, 180):
        Rejection.objects.create(exchange_id="binance", at=now - timedelta(minutes=minutes), retry_after=1.0)

    content = admin_client.get(INDEX).content.decode()

    assert '<td class="num rejected" data-count="2">2</td>' in content


def test_index_costs_a_bounded_number_of_queries(admin_client, fleet, django_assert_max_num_queries) -> None:
    connector = Connector.objects.get()
    Job.objects.bulk_create(Job(connector=connector, symbol=f"C{i}/USDT", timeframe="1m") for i in range(200))

    with django_assert_max_num_queries(30):
        assert admin_client.get(INDEX).status_code == 200


def test_staff_without_job_permissions_gets_the_plain_index(client, fleet) -> None:
    staff = get_user_model().objects.create_user("viewer", password="viewer-password-1", is_staff=True)
    grant(staff, "view_connector")
    client.force_login(staff)

    content = client.get(INDEX).content.decode()

    assert 'id="fleet"' not in content
    assert "dashboard.js" not in content
