import json
import os
import socket
from datetime import datetime, timedelta

from django.db import connections, models
from django.utils import timezone

from datacollector.config import get_config
from datacollector.version import version


class LiveEventQuerySet(models.QuerySet):
    def append(self, messages: list[tuple[list[str], dict]]) -> None:
        """Insert (groups, payload) messages, a row each, in one INSERT. Outside a transaction it runs on its
        own, without the BEGIN and COMMIT that bulk_create wraps around it: a live run publishes on every run.
        One row per message, not per group: a client subscribed to two of its groups gets it once."""
        if not messages:
            return
        connection = connections[self.db]
        if connection.in_atomic_block:
            now = timezone.now()
            self.bulk_create(
                [LiveEvent(groups=groups, payload=payload, created_at=now) for groups, payload in messages]
            )
            return
        cast = "::jsonb" if connection.vendor == "postgresql" else ""
        rows = ", ".join([f"(%s{cast}, %s{cast}, %s)"] * len(messages))
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        params = [value for groups, payload in messages for value in (json.dumps(groups), json.dumps(payload), now)]
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {LiveEvent._meta.db_table} (groups, payload, created_at) VALUES {rows}", params
            )

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

    groups = models.JSONField()  # the groups the message goes to
    payload = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = LiveEventQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{', '.join(self.groups)} #{self.pk}"


class SchedulerProcessQuerySet(models.QuerySet):
    def register(self, worker_id: str, workers: int) -> "SchedulerProcess":
        """Add the calling process to the fleet; rows of processes gone for a week are dropped meanwhile."""
        now = timezone.now()
        self.filter(last_heartbeat__lt=now - FORGET_AFTER).delete()
        return self.create(
            worker_id=worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            workers=workers,
            version=version(),
            started_at=now,
            last_heartbeat=now,
        )

    def running(self) -> "SchedulerProcessQuerySet":
        """Processes that have not deregistered: alive, or lost (killed, hung, cut off from the database)."""
        return self.filter(stopped_at__isnull=True)

    def alive(self, now: datetime | None = None) -> "SchedulerProcessQuerySet":
        return self.running().filter(last_heartbeat__gte=_lost_before(now))

    def lost(self, now: datetime | None = None) -> "SchedulerProcessQuerySet":
        return self.running().filter(last_heartbeat__lt=_lost_before(now))


# Rows of processes silent (stopped or lost) for this long are deleted when another process registers.
FORGET_AFTER = timedelta(days=7)


def _lost_before(now: datetime | None) -> datetime:
    return (now or timezone.now()) - timedelta(seconds=get_config().scheduler.lost_after_seconds)


class SchedulerProcess(models.Model):
    """One `run_scheduler` process: registered at start, a heartbeat every `scheduler.heartbeat_seconds`,
    deregistered at exit. One that stops beating without deregistering (SIGKILL, a hung host, a lost
    network) is shown as lost after `scheduler.lost_after_seconds`."""

    class State(models.TextChoices):
        ALIVE = "alive"
        LOST = "lost"
        STOPPED = "stopped"

    worker_id = models.CharField(max_length=200, help_text="The name its leases and runs carry (host:pid).")
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    workers = models.PositiveIntegerField(help_text="Worker threads.")
    version = models.CharField(max_length=50)
    started_at = models.DateTimeField(default=timezone.now)
    last_heartbeat = models.DateTimeField(default=timezone.now)
    stopped_at = models.DateTimeField(null=True, blank=True, help_text="When it deregistered (a clean exit).")

    objects = SchedulerProcessQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]
        verbose_name_plural = "scheduler processes"
        indexes = [models.Index(fields=["stopped_at", "last_heartbeat"], name="schedulerprocess_state_idx")]

    def __str__(self) -> str:
        return self.worker_id

    @property
    def state(self) -> str:
        if self.stopped_at is not None:
            return self.State.STOPPED
        return self.State.ALIVE if self.last_heartbeat >= _lost_before(None) else self.State.LOST

    def beat(self) -> None:
        """Record a heartbeat (one UPDATE). A process marked stopped stays stopped."""
        self.last_heartbeat = timezone.now()
        SchedulerProcess.objects.filter(pk=self.pk, stopped_at__isnull=True).update(last_heartbeat=self.last_heartbeat)

    def deregister(self) -> None:
        self.stopped_at = timezone.now()
        SchedulerProcess.objects.filter(pk=self.pk).update(stopped_at=self.stopped_at, last_heartbeat=self.stopped_at)
