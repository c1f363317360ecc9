from datetime import timedelta

from django.db import models
from django.utils import timezone


class LiveEventQuerySet(models.QuerySet):
    def trim(self, older_than_seconds: float) -> int:
        """Delete events older than that: the relays have long passed them on."""
        cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
        return self.filter(created_at__lt=cutoff).delete()[0]


class LiveEvent(models.Model):
    """The embedded hub's outbox: a live update on its way from the process that committed the data to the
    web processes, which relay it to their WebSocket clients (`apps.monitoring.hub.OutboxRelay`).

    Used only without REDIS_URL (the `make run` default), where the web and the scheduler are separate
    processes with no server between them but the database. With Redis the layer carries the updates and
    this table stays empty. Rows live a few minutes.
    """

    group = models.CharField(max_length=100)
    payload = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = LiveEventQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.group} #{self.pk}"
