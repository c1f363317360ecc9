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


def test_rate_limits_are_read_only(api_client, db) -> None:
    row = RateLimit.objects.create(exchange_id="x-test", capacity=1, refill_per_second=1, tokens=1)

    assert api_client.post("/api/v1/ratelimits/", {"exchange_id": "y"}).status_code == 405
    assert api_client.patch(f"/api/v1/ratelimits/{row.pk}/", {"tokens": 5}).status_code == 405
    assert api_client.delete(f"/api/v1/ratelimits/{row.pk}/").status_code == 405
