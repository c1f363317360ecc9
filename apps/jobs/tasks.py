"""Run one claimed background task (`Task`): look its kind up in HANDLERS, call the handler, record.

A kind plugs in with one line here and one function where its work lives: add a `Task.Kind` value and
map it in HANDLERS to the dotted path of `def handler(task: Task) -> dict`. The handler reads its input
from `task.params`, calls `task.report(progress, message)` as it goes (that renews the lease, and raises
`TaskLost` if the task was cancelled or reclaimed: let it propagate), and returns a JSON-serialisable
dict, which becomes `task.result`. Raising fails the task with the exception's message; it never stops
the worker. Handlers are imported when a task of their kind runs, so a path that does not import yet
fails that task with a message saying so, and nothing else. `run_scheduler` workers run tasks when no
candle job is due (`Scheduler.process_one`); `run_task` can also be called directly, in the foreground.
"""

import logging

from django.utils.module_loading import import_string

from apps.jobs.models import Task, TaskLost

logger = logging.getLogger("apps.jobs.tasks")

HANDLERS: dict[str, str] = {
    Task.Kind.EXPORT: "apps.marketdata.exports.run_export_task",
    Task.Kind.INDICATORS: "apps.marketdata.indicators.run_compute_task",
    Task.Kind.PURGE: "apps.marketdata.retention.run_purge_task",
    Task.Kind.MARKETS: "apps.connectors.models.run_markets_task",
}


def run_task(task: Task) -> str:
    """Run `task` (claimed, or created for the foreground) and record its outcome; returns its status.

    Never raises for the task's own failures: they are recorded on the row and logged.
    """
    path = HANDLERS.get(task.kind)
    if path is None:
        task.fail(f"no handler for tasks of kind {task.kind!r}; known kinds: {', '.join(sorted(HANDLERS))}")
        return task.status
    try:
        handler = import_string(path)
    except ImportError as exc:
        task.fail(f"the handler {path!r} of {task.kind!r} tasks cannot be imported: {exc}")
        logger.error("task %s: handler %s cannot be imported: %s", task.pk, path, exc, extra={"task_id": task.pk})
        return task.status
    extra = {"task_id": task.pk, "kind": task.kind, "worker": task.lease_owner}
    try:
        result = handler(task)
    except TaskLost as exc:
        # Cancelled or reclaimed: whoever holds the task now records its outcome.
        logger.warning("%s", exc, extra=extra)
        return Task.Status.CANCELLED if _status(task) == Task.Status.CANCELLED else "lost"
    except Exception as exc:
        logger.exception("task %s (%s) failed", task.pk, task.kind, extra=extra)
        task.fail(f"{type(exc).__name__}: {exc}")
        return task.status
    if not task.succeed(result if isinstance(result, dict) else {"result": result}):
        logger.warning("task %s: finished, but its claim was lost meanwhile", task.pk, extra=extra)
        return "lost"
    logger.info("task %s (%s) %s", task.pk, task.kind, task.status, extra=extra)
    return task.status


def _status(task: Task) -> str:
    return Task.objects.filter(pk=task.pk).values_list("status", flat=True).first() or ""
