"""The fixed-window mode of the shared limit (exchanges that count weight per calendar minute, like Binance).

Every behaviour runs through the single-statement PostgreSQL path and the locked Python path SQLite uses.
Windows follow the database clock, which cannot be frozen: these tests use a window so long (10^9 s, the
current one runs from 2001 to 2033) that none ends while they run.
"""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from apps.ratelimits.models import RateLimit, RateLimitQuerySet, acquire_token

pytestmark = pytest.mark.django_db

WINDOW = 10**9
THIS_WINDOW = datetime.fromtimestamp(WINDOW, tz=UTC)  # 2001-09-09
LAST_WINDOW = datetime.fromtimestamp(0, tz=UTC)


@pytest.fixture(params=["single-statement", "locked-python"])
def path(request, monkeypatch) -> str:
    if request.param == "locked-python":
        monkeypatch.setattr(RateLimitQuerySet, "_postgres", lambda self: False)
    return request.param


def window(capacity: float = 10, per_window: float = 100, **fields) -> RateLimit:
    """A window of `capacity + per_window` weight (the bucket's burst plus a window of its refill)."""
    return RateLimit.objects.create(
        exchange_id="testex",
        capacity=capacity,
        refill_per_second=per_window / WINDOW,
        tokens=capacity,
        window_seconds=WINDOW,
        **fields,
    )


def test_a_window_grants_its_whole_budget_at_once_then_waits_for_the_next_window(path):
    window(capacity=10, per_window=100)
    assert acquire_token("testex", 60) == 0.0  # more than a token bucket of capacity 10 could give at once
    assert acquire_token("testex", 50) == 0.0
    wait = acquire_token("testex", 1)
    until_next = (THIS_WINDOW + timedelta(seconds=WINDOW) - timezone.now()).total_seconds()
    assert until_next <= wait < until_next + 60  # told before until_next was computed
    row = RateLimit.objects.get(exchange_id="testex")
    assert (row.granted, row.denied, row.window_used, row.window_started_at) == (2, 1, 110, THIS_WINDOW)


def test_a_new_window_forgets_what_the_last_one_spent(path):
    window(capacity=10, per_window=100, window_started_at=LAST_WINDOW, window_used=110)
    assert acquire_token("testex", 110) == 0.0
    row = RateLimit.objects.get(exchange_id="testex")
    assert (row.window_used, row.window_started_at) == (110, THIS_WINDOW)


def test_a_request_heavier_than_the_window_is_a_clear_error(path):
    window(capacity=10, per_window=100)
    with pytest.raises(ValueError, match="exceeds the capacity 110"):
        acquire_token("testex", 111)


def test_the_exchanges_higher_count_replaces_ours_and_a_lower_one_changes_nothing(path):
    window(capacity=10, per_window=100, window_started_at=THIS_WINDOW, window_used=20)
    RateLimit.objects.observe_used_weight("testex", used_weight=100, limit=120)  # someone else spent 80
    assert RateLimit.objects.get(exchange_id="testex").window_used == 100
    RateLimit.objects.observe_used_weight("testex", used_weight=50, limit=120)
    assert RateLimit.objects.get(exchange_id="testex").window_used == 100
    assert acquire_token("testex", 10) == 0.0
    assert acquire_token("testex", 1) > 0


def test_a_spent_exchange_budget_pauses_every_caller_until_the_window_ends(path):
    window(capacity=10, per_window=100, window_started_at=THIS_WINDOW, window_used=20)
    RateLimit.objects.observe_used_weight("testex", used_weight=120, limit=120)
    row = RateLimit.objects.get(exchange_id="testex")
    assert row.blocked_until == THIS_WINDOW + timedelta(seconds=WINDOW)


def test_a_token_bucket_ignores_the_window_statement(path):
    RateLimit.objects.create(exchange_id="testex", capacity=300, refill_per_second=90, tokens=300)
    RateLimit.objects.observe_used_weight("testex", used_weight=100, limit=6000)
    row = RateLimit.objects.get(exchange_id="testex")
    assert (row.window_started_at, row.window_used) == (None, 0)


def test_an_exchange_announcing_a_fixed_window_switches_its_row_to_it_capped_at_95_percent(path):
    RateLimit.objects.create(
        exchange_id="testex", capacity=1000, refill_per_second=100, tokens=1000, configured_capacity=1000
    )
    row, changed = RateLimit.objects.learn_announced_limit("testex", 6000, window_seconds=60.0)
    assert changed
    assert row.window_seconds == 60.0
    assert row.limit == pytest.approx(0.95 * 6000)
    row, changed = RateLimit.objects.learn_announced_limit("testex", 6000, window_seconds=60.0)
    assert not changed
