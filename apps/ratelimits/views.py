from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import filters, viewsets

from apps.ratelimits.models import RateLimit
from apps.ratelimits.serializers import RateLimitSerializer


class RateLimitViewSet(viewsets.ReadOnlyModelViewSet):
    """The shared token bucket of each exchange, its back-off and circuit state, and its counters."""

    queryset = RateLimit.objects.all()
    serializer_class = RateLimitSerializer
    filter_backends = [DjangoFilterBackend, filters.OrderingFilter]
    filterset_fields = ["exchange_id"]
    ordering_fields = ["exchange_id", "tokens", "granted", "denied", "tokens_used", "wait_seconds"]
