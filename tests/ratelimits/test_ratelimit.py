"""The shared token bucket: grants, waits, refill, pauses, the circuit breaker.

Every behaviour runs twice: through the single-statement PostgreSQL path and through the portable
path SQLite uses (a locked read-modify-write), forced here on PostgreSQL by switching the vendor check.
"""

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.utils import timezone

from apps.connectors.models import Connector
from apps.ratelimits import models as ratelimit_models
from apps.ratelimits.models import RateLimit, RateLimitQuerySet, RateLimitTimeout, _decide, acquire, acquire_token

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["single-statement", "locked-python"])
def path(request, monkeypatch) -> str:
    if request.param == "locked-python":
        monkeypatch.setattr(RateLimitQuerySet, "_postgres", lambda self: False)
    return request.param


def bucket(exchange_id: str = "testex", capacity: float = 10, refill: float = 1, tokens: float | None = None):
    row = RateLimit.objects.create(
        exchange_id=exchange_id,
        capacity=capacity,
        refill_per_second=refill,
        tokens=capacity if tokens is None else tokens,
    )
    age(exchange_id, 0)
    return row


def age(exchange_id: str, seconds: float) -> None:
    """Pretend `seconds` passed since the bucket was last touched (the database clock cannot be frozen)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE ratelimits_ratelimit SET updated_at = clock_timestamp() - make_interval(secs => %s) "
            "WHERE exchange_id = %s",
            [seconds, exchange_id],
        )


def test_grants_while_tokens_last_then_reports_the_wait(path):
    bucket(capacity=10, refill=1)
    assert acquire_token("testex", 5) == 0.0
    assert acquire_token("testex", 5) == 0.0
    wait = acquire_token("testex", 5)
    assert 4.5 < wait <= 5.0
    row = RateLimit.objects.get(exchange_id="testex")
    assert (row.granted, row.denied, row.tokens_used) == (2, 1, 10)
    assert row.tokens < 0.1


def test_refills_by_elapsed_time_up_to_capacity(path):
    bucket(capacity=10, refill=2, tokens=0)
    age("testex", 3)
    assert acquire_token("testex", 6) == 0.0
    assert acquire_token("testex", 6) > 0
    age("testex", 3600)
    assert acquire_token("testex", 10) == 0.0
    assert 0.4 < acquire_token("testex", 1) <= 0.5


def test_a_denied_request_takes_nothing(path):
    bucket(capacity=10, refill=1, tokens=4)
    assert acquire_token("testex", 5) > 0
    assert acquire_token("testex", 4) == 0.0


def test_weight_above_capacity_is_a_clear_error(path):
    bucket(capacity=10)
    with pytest.raises(ValueError, match=r"request weight 11 exceeds the capacity 10 of the 'testex'"):
        acquire_token("testex", 11)
    assert RateLimit.objects.get(exchange_id="testex").denied == 0


def test_missing_row_is_created_with_the_callers_limit(path):
    # The exchange client passes its connector's limit: the ratelimits app itself knows no connector.
    Connector.objects.create(exchange_id="kraken", rate_limit_weight_per_minute=600, rate_limit_burst=7)
    RateLimit.objects.filter(exchange_id="kraken").delete()
    assert RateLimit.objects.acquire_token("kraken", 7, limit=(7, 10)) == 0.0
    row = RateLimit.objects.get(exchange_id="kraken")
    assert (row.capacity, row.refill_per_second, row.granted) == (7, 10, 1)
    assert (row.configured_capacity, row.configured_refill_per_second) == (7, 10)


def test_missing_row_without_connector_uses_the_yaml_default(path):
    assert acquire_token("binance", 1) == 0.0
    row = RateLimit.objects.get(exchange_id="binance")
    assert (row.capacity, row.refill_per_second) == (300, 90)


def test_saving_a_connector_resizes_its_bucket_keeping_spent_tokens_spent(path):
    connector = Connector.objects.create(exchange_id="kraken", rate_limit_weight_per_minute=600, rate_limit_burst=50)
    assert acquire_token("kraken", 45) == 0.0
    connector.rate_limit_burst = 20
    connector.rate_limit_weight_per_minute = 120
    connector.save()
    row = RateLimit.objects.get(exchange_id="kraken")
    assert (row.capacity, row.refill_per_second) == (20, 2)
    assert row.tokens < 6


def test_retry_after_pauses_every_caller(path):
    bucket(capacity=10, refill=1)
    RateLimit.objects.block("testex", 30)
    wait = acquire_token("testex", 1)
    assert 29 < wait <= 30
    assert RateLimit.objects.get(exchange_id="testex").denied == 1


def seconds_to_next_minute() -> float:
    now = timezone.now()
    return (now.replace(second=0, microsecond=0) + timedelta(minutes=1) - now).total_seconds()


def test_reported_used_weight_drains_the_bucket_counting_the_refill_until_the_minute_ends(path):
    bucket(capacity=300, refill=90)
    RateLimit.objects.observe_used_weight("testex", used_weight=5990, limit=6000)
    row = RateLimit.objects.get(exchange_id="testex")
    # What the bucket can still grant this minute (its tokens plus the refill until the minute rolls
    # over) is at most the 10 the exchange has left.
    assert row.tokens + 90 * seconds_to_next_minute() <= 10.01
    assert row.tokens >= -90 * 60


def test_reported_weight_leaving_more_than_a_bucket_changes_nothing(path):
    bucket(capacity=300, refill=90, tokens=12)
    before = RateLimit.objects.get(exchange_id="testex")
    RateLimit.objects.observe_used_weight("testex", used_weight=100, limit=6000)
    after = RateLimit.objects.get(exchange_id="testex")
    assert (after.tokens, after.updated_at) == (before.tokens, before.updated_at)


def test_exhausted_exchange_budget_pauses_until_the_next_minute(path):
    bucket(capacity=300, refill=90)
    RateLimit.objects.observe_used_weight("testex", used_weight=6000, limit=6000)
    row = RateLimit.objects.get(exchange_id="testex")
    assert row.tokens + 90 * seconds_to_next_minute() <= 0.01
    assert row.blocked_until.second == 0
    assert row.blocked_until.microsecond == 0
    assert timezone.now() < row.blocked_until <= timezone.now() + timedelta(seconds=61)
    assert acquire_token("testex", 1) > 0


def test_circuit_opens_at_the_threshold_and_an_ordinary_success_does_not_close_it(path):
    bucket(capacity=10)
    opened = [RateLimit.objects.record_failure("testex", threshold=3, cooldown=60) for _ in range(4)]
    assert opened == [False, False, True, False]  # the fourth finds it open already
    assert 59 < acquire_token("testex", 1) <= 60
    RateLimit.objects.record_success("testex")  # a request sent before it opened
    row = RateLimit.objects.get(exchange_id="testex")
    assert row.circuit_open_until is not None
    assert row.circuit_failures == 4


def test_success_of_a_closed_circuit_resets_the_failure_count(path):
    bucket(capacity=10)
    RateLimit.objects.record_failure("testex", threshold=3, cooldown=60)
    RateLimit.objects.record_success("testex")
    row = RateLimit.objects.get(exchange_id="testex")
    assert (row.circuit_failures, row.circuit_open_until) == (0, None)


def half_open(exchange_id: str = "testex") -> None:
    for _ in range(3):
        RateLimit.objects.record_failure(exchange_id, threshold=3, cooldown=60)
    RateLimit.objects.filter(exchange_id=exchange_id).update(circuit_open_until=timezone.now() - timedelta(seconds=1))


def test_half_open_lets_one_trial_through_and_closes_after_three_trial_successes(path):
    bucket(capacity=10)
    half_open()
    for success in range(1, 4):
        assert RateLimit.objects.claim_trial("testex", lease_seconds=60) is True
        # Every other worker waits for the trial's outcome.
        assert RateLimit.objects.claim_trial("testex", lease_seconds=60) is False
        RateLimit.objects.record_success("testex", trial=True, successes_to_close=3)
        row = RateLimit.objects.get(exchange_id="testex")
        if success < 3:
            assert (row.circuit_successes, row.circuit_trial_until) == (success, None)
            assert row.circuit_open_until is not None
    assert (row.circuit_failures, row.circuit_open_until, row.circuit_successes) == (0, None, 0)


def test_a_failed_trial_reopens_the_circuit_and_forgets_the_trial_successes(path):
    bucket(capacity=10)
    half_open()
    assert RateLimit.objects.claim_trial("testex", lease_seconds=60)
    RateLimit.objects.record_success("testex", trial=True, successes_to_close=3)
    assert RateLimit.objects.claim_trial("testex", lease_seconds=60)
    assert RateLimit.objects.record_failure("testex", threshold=3, cooldown=60) is True
    row = RateLimit.objects.get(exchange_id="testex")
    assert row.circuit_open_until > timezone.now() + timedelta(seconds=59)
    assert (row.circuit_successes, row.circuit_trial_until) == (0, None)
    assert RateLimit.objects.claim_trial("testex", lease_seconds=60) is False  # open: no trial yet


def test_a_trial_whose_worker_died_is_taken_over_after_its_lease(path):
    bucket(capacity=10)
    half_open()
    assert RateLimit.objects.claim_trial("testex", lease_seconds=60)
    RateLimit.objects.filter(exchange_id="testex").update(circuit_trial_until=timezone.now() - timedelta(seconds=1))
    assert RateLimit.objects.claim_trial("testex", lease_seconds=60)
    assert acquire_token("testex", 1) == 0.0


def test_failure_after_the_cooldown_reopens_the_circuit_at_once(path):
    bucket(capacity=10)
    for _ in range(3):
        RateLimit.objects.record_failure("testex", threshold=3, cooldown=60)
    RateLimit.objects.filter(exchange_id="testex").update(circuit_open_until=timezone.now() - timedelta(seconds=1))
    assert RateLimit.objects.record_failure("testex", threshold=3, cooldown=60) is True


def test_acquire_sleeps_exactly_the_reported_wait(path, monkeypatch):
    bucket(capacity=10, refill=4, tokens=0)
    sleeps = []

    # Mocked: a real sleep has no place in a unit test. Time "passes" by moving the bucket's last
    # update back by the time slept.
    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        RateLimit.objects.filter(exchange_id="testex").update(updated_at=F("updated_at") - timedelta(seconds=seconds))

    monkeypatch.setattr(ratelimit_models.time, "sleep", fake_sleep)
    waited = acquire("testex", 2, timeout=5)
    assert len(sleeps) == 1
    assert 0.4 < sleeps[0] <= 0.5
    assert waited == sleeps[0]
    row = RateLimit.objects.get(exchange_id="testex")
    assert row.wait_seconds == pytest.approx(waited)
    assert row.granted == 1


def test_acquire_gives_up_before_sleeping_past_the_timeout(path, monkeypatch):
    bucket(capacity=10, refill=1, tokens=0)
    monkeypatch.setattr(ratelimit_models.time, "sleep", lambda seconds: pytest.fail("slept"))
    with pytest.raises(RateLimitTimeout, match=r"'testex': weight 5 not available within the 2s timeout"):
        acquire("testex", 5, timeout=2)


def test_decision_never_credits_time_before_the_last_update():
    row = RateLimit(capacity=10, refill_per_second=1, tokens=3, updated_at=datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC))
    stale = _decide(row, 5, datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC))
    assert not stale.granted
    assert stale.tokens == 3
    assert stale.updated_at == row.updated_at
    assert stale.wait == 2


@pytest.mark.django_db(transaction=True)
def test_acquire_outside_a_transaction_commits_asynchronously_without_leaking_the_setting():
    bucket(capacity=10)
    assert acquire_token("testex", 1) == 0.0
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
    assert RateLimit.objects.get(exchange_id="testex").granted == 1
