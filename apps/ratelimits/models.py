from django.db import models
from django.utils import timezone


class RateLimit(models.Model):
    """The token bucket one exchange's requests share, across every process on every machine."""

    exchange_id = models.CharField(max_length=64, unique=True)
    capacity = models.FloatField(help_text="Bucket size: the largest burst of weight.")
    refill_per_second = models.FloatField(help_text="Weight added back per second (weight per minute / 60).")
    tokens = models.FloatField(help_text="Weight available at updated_at.")
    updated_at = models.DateTimeField(default=timezone.now)
    blocked_until = models.DateTimeField(
        null=True, blank=True, help_text="The exchange asked us to back off (429/418 Retry-After) until then."
    )
    circuit_failures = models.PositiveIntegerField(
        default=0, help_text="Consecutive transient failures across all workers."
    )
    circuit_open_until = models.DateTimeField(
        null=True, blank=True, help_text="Circuit breaker open: no requests to this exchange until then."
    )
    granted = models.BigIntegerField(default=0)
    denied = models.BigIntegerField(default=0)
    tokens_used = models.FloatField(default=0.0)
    wait_seconds = models.FloatField(default=0.0, help_text="Total seconds callers waited for tokens.")

    class Meta:
        ordering = ["exchange_id"]

    def __str__(self) -> str:
        return self.exchange_id
