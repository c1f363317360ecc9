from datetime import UTC, datetime, timedelta

import time_machine

from apps.ratelimits.models import RateLimit

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@time_machine.travel(NOW, tick=False)
def test_rate_limits_show_the_refilled_bucket_and_breaker_state(api_client, db) -> None:
    RateLimit.objects.filter(exchange_id="binance").delete()
    RateLimit.objects.create(
        exchange_id="binance",
        capacity=100,
        refill_per_second=10,
        tokens=20,
        updated_at=NOW - timedelta(seconds=3),
        circuit_open_until=NOW + timedelta(seconds=30),
        granted=7,
    )

    response = api_client.get("/api/v1/ratelimits/?exchange_id=binance")

    assert response.status_code == 200
    [row] = response.data["results"]
    assert row["tokens_available"] == 50.0
    assert row["circuit"] == "open"
    assert row["blocked"] is False
    assert row["granted"] == 7


@time_machine.travel(NOW + timedelta(seconds=20), tick=False)
def test_a_fixed_window_shows_what_the_current_window_has_left(api_client, db) -> None:
    # Binance's mode: 5,700 a minute + a burst of 300 = 6,000 per clock minute, 4,000 of it spent.
    RateLimit.objects.filter(exchange_id="binance").delete()
    RateLimit.objects.create(
        exchange_id="binance",
        capacity=300,
        refill_per_second=95,
        tokens=300,
        updated_at=NOW + timedelta(seconds=19),
        window_seconds=60,
        window_started_at=NOW,
        window_used=4_000,
    )

    [row] = api_client.get("/api/v1/ratelimits/?exchange_id=binance").data["results"]

    assert row["tokens_available"] == 2_000.0


def test_rate_limits_are_read_only(api_client, db) -> None:
    row = RateLimit.objects.create(exchange_id="x-test", capacity=1, refill_per_second=1, tokens=1)

    assert api_client.post("/api/v1/ratelimits/", {"exchange_id": "y"}).status_code == 405
    assert api_client.patch(f"/api/v1/ratelimits/{row.pk}/", {"tokens": 5}).status_code == 405
    assert api_client.delete(f"/api/v1/ratelimits/{row.pk}/").status_code == 405
