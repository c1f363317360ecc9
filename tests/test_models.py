"""The database enforces what the code relies on: introspect the real PostgreSQL schema."""

import pytest
from django.db import IntegrityError, connection

from apps.connectors.models import Connector
from apps.jobs.models import Job
from apps.marketdata.models import Candle
from apps.ratelimits.models import RateLimit


def constraints(model) -> dict[str, dict]:
    with connection.cursor() as cursor:
        return connection.introspection.get_constraints(cursor, model._meta.db_table)


def find(model, columns: list[str], **flags) -> list[str]:
    return [
        name
        for name, info in constraints(model).items()
        if info["columns"] == columns and all(info.get(key) == value for key, value in flags.items())
    ]


@pytest.mark.django_db
def test_job_series_is_unique_in_the_database() -> None:
    assert find(Job, ["connector_id", "symbol", "timeframe"], unique=True)


@pytest.mark.django_db
def test_jobs_have_an_index_on_status_and_next_run_at() -> None:
    assert find(Job, ["status", "next_run_at"], index=True)


@pytest.mark.django_db
def test_runs_have_a_history_index_per_job_newest_first() -> None:
    [name] = find(Run := Job.runs.rel.related_model, ["job_id", "started_at"], index=True)
    assert constraints(Run)[name]["orders"] == ["ASC", "DESC"]


@pytest.mark.django_db
def test_connector_exchange_id_is_unique() -> None:
    assert find(Connector, ["exchange_id"], unique=True)


@pytest.mark.django_db
def test_rate_limit_exchange_id_is_unique() -> None:
    assert find(RateLimit, ["exchange_id"], unique=True)


@pytest.mark.django_db
def test_candle_key_is_unique() -> None:
    assert find(Candle, ["exchange_id", "symbol", "timeframe", "ts"], unique=True)


@pytest.mark.django_db
def test_duplicate_series_is_rejected_by_the_database_itself(simulated) -> None:
    Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m")

    with pytest.raises(IntegrityError):
        Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m")
