from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from apps.ratelimits.models import RateLimit
from apps.ratelimits.serializers import available_tokens, circuit_state


@admin.register(RateLimit)
class RateLimitAdmin(admin.ModelAdmin):
    """The rate-limit panel: each exchange's shared bucket, back-off, circuit breaker and counters.

    Read-only: the buckets are written by `acquire_token` from every worker; limits are set on the connector.
    """

    list_display = [
        "exchange_id",
        "tokens_now",
        "capacity",
        "refill_per_second",
        "announced",
        "fill",
        "blocked_until",
        "circuit",
        "circuit_failures",
        "granted",
        "denied",
        "tokens_used",
        "wait_seconds",
        "updated_at",
    ]
    search_fields = ["exchange_id"]
    readonly_fields = ["tokens_now", "fill", "circuit", "announced"]

    @admin.display(description="Announced by the exchange")
    def announced(self, rate_limit: RateLimit) -> str:
        if rate_limit.announced_weight_per_minute is None:
            return "-"
        text = f"{rate_limit.announced_weight_per_minute:,}/min"
        if rate_limit.capped:
            configured = f"{rate_limit.configured_weight_per_minute:,.0f}/min"
            return format_html("{} <strong>(configured {} capped to it)</strong>", text, configured)
        return text

    @admin.display(description="Tokens now")
    def tokens_now(self, rate_limit: RateLimit) -> str:
        return f"{available_tokens(rate_limit):.1f}"

    @admin.display(description="Fill")
    def fill(self, rate_limit: RateLimit) -> str:
        percent = 100.0 * available_tokens(rate_limit) / rate_limit.capacity if rate_limit.capacity else 0.0
        return format_html('<progress max="100" value="{}" title="{}%"></progress>', f"{percent:.0f}", f"{percent:.0f}")

    @admin.display(description="Circuit")
    def circuit(self, rate_limit: RateLimit) -> str:
        state = circuit_state(rate_limit)
        if state == "open":
            return format_html(
                '<strong style="color:#ba2121">open</strong> until {}', f"{rate_limit.circuit_open_until:%H:%M:%S} UTC"
            )
        if state == "half-open":
            return f"half-open ({rate_limit.circuit_successes} trial success(es) in a row)"
        blocked = rate_limit.blocked_until is not None and rate_limit.blocked_until > timezone.now()
        return "closed (exchange asked to back off)" if blocked else "closed"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: RateLimit | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: RateLimit | None = None) -> bool:
        return False
