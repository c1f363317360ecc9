from datetime import datetime

from django.utils import timezone
from rest_framework import serializers

from apps.ratelimits.models import RateLimit


def available_tokens(rate_limit: RateLimit, now: datetime | None = None) -> float:
    """What the bucket can grant now, out of `rate_limit.limit`: in window mode what the current window has
    left; else the stored level refilled for the time since, capped at the capacity.

    Display only; `acquire_token` does the same arithmetic atomically in the database.
    """
    now = now or timezone.now()
    if rate_limit.window_seconds is not None:
        return max(0.0, rate_limit.limit - rate_limit.window_at(now)[1])
    elapsed = max(0.0, (now - rate_limit.updated_at).total_seconds())
    return min(rate_limit.capacity, rate_limit.tokens + elapsed * rate_limit.refill_per_second)


def circuit_state(rate_limit: RateLimit, now: datetime | None = None) -> str:
    """closed; open (no requests until circuit_open_until); half-open (one trial request at a time)."""
    now = now or timezone.now()
    if rate_limit.circuit_open_until is None:
        return "closed"
    return "open" if rate_limit.circuit_open_until > now else "half-open"


class RateLimitSerializer(serializers.HyperlinkedModelSerializer):
    tokens_available = serializers.SerializerMethodField(help_text="Tokens in the bucket now (refilled since).")
    circuit = serializers.SerializerMethodField(
        help_text="closed; open: no requests until circuit_open_until; half-open: one trial request at a time."
    )
    configured_weight_per_minute = serializers.FloatField(
        read_only=True, help_text="The weight per minute the connector asks for."
    )
    effective_weight_per_minute = serializers.FloatField(
        read_only=True, help_text="What the bucket refills per minute: the configured value, capped to the announced."
    )
    capped = serializers.BooleanField(
        read_only=True, help_text="The exchange announces less than configured: the bucket is capped to it."
    )
    blocked = serializers.SerializerMethodField(help_text="The exchange asked us to back off until blocked_until.")

    class Meta:
        model = RateLimit
        fields = [
            "id",
            "url",
            "exchange_id",
            "capacity",
            "refill_per_second",
            "tokens",
            "tokens_available",
            "updated_at",
            "blocked",
            "blocked_until",
            "circuit",
            "circuit_failures",
            "circuit_open_until",
            "circuit_successes",
            "announced_weight_per_minute",
            "configured_capacity",
            "configured_weight_per_minute",
            "effective_weight_per_minute",
            "capped",
            "granted",
            "denied",
            "tokens_used",
            "wait_seconds",
        ]
        read_only_fields = fields

    def get_tokens_available(self, rate_limit: RateLimit) -> float:
        return round(available_tokens(rate_limit), 3)

    def get_circuit(self, rate_limit: RateLimit) -> str:
        return circuit_state(rate_limit)

    def get_blocked(self, rate_limit: RateLimit) -> bool:
        return rate_limit.blocked_until is not None and rate_limit.blocked_until > timezone.now()
