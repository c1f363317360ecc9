"""A `run_scheduler` process's membership of the fleet registry (`SchedulerProcess`): registered when it
starts, a heartbeat from a thread of its own every `scheduler.heartbeat_seconds`, deregistered at a clean
exit. The thread keeps beating while the workers are busy or waiting on an exchange, so only a process
that is gone (or cut off from the database) goes quiet; a database outage delays the registration or a
beat, never the work."""

import logging
import threading

from django.db import DatabaseError, connection

from apps.monitoring.models import SchedulerProcess
from datacollector.config import get_config

logger = logging.getLogger("apps.monitoring.fleet")


class Membership:
    def __init__(self, worker_id: str, workers: int, interval: float | None = None) -> None:
        self.worker_id = worker_id
        self.workers = workers
        self.interval = interval if interval is not None else get_config().scheduler.heartbeat_seconds
        self.process: SchedulerProcess | None = None
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name=f"{worker_id}/heartbeat", daemon=True)

    def start(self) -> "Membership":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Deregister (from the heartbeat thread, which owns the connection) and wait for it."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                self._step(self.process.beat if self.process is not None else self._register)
                if self._stop.wait(self.interval):
                    break
            if self.process is not None:
                self._step(self.process.deregister)
        finally:
            connection.close()

    def _register(self) -> None:
        self.process = SchedulerProcess.objects.register(self.worker_id, self.workers)
        logger.info("registered in the fleet as process %s", self.process.pk, extra={"worker": self.worker_id})

    def _step(self, write) -> None:
        try:
            write()
        except DatabaseError as exc:
            if not self._failing:
                logger.warning("fleet heartbeat failed: %s", exc, extra={"worker": self.worker_id})
            self._failing = True
            connection.close()  # a fresh connection next time
            return
        self._failing = False
