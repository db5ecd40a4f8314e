"""One step attempt under its Celery task: where it runs, how it is stopped, how the task ends.

- **prefork**: in the pool child, as before. Celery's soft time limit (``timeout_s``) raises
  :class:`~zenml_workers.errors.StepTimeoutError` there (not billiard's
  ``SoftTimeLimitExceeded``, so every pool records the same failure); its hard limit
  (``timeout_s + ZW_STOP_GRACE_S``) kills the child, and the worker's main process records
  that failure (:meth:`AttemptRunner.record_hard_timeout`). A cancel is Celery's revoke
  with ``terminate``.
- **solo**: in the worker's :class:`~zenml_workers.worker.stephost.StepHost` (unless
  ``ZW_STEP_HOST=0``), which stops it on cancel, ``timeout_s`` and shutdown.

The task then ends as the attempt did (:func:`end_task`), so Flower tells the truth.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from scheduler.dispatch import QueuedStep
from scheduler.specs import StepTask
from zenml_workers.errors import StepFailedError, StoreMismatchError, UntrustedInputError
from zenml_workers.worker import stop
from zenml_workers.worker.outcome import Ended, Outcome, how_it_ended

log = logging.getLogger("zenml_workers.worker")


@dataclass(frozen=True)
class Attempt:
    """What an attempt gave its task: the tasks to send and how it ended."""

    follow: list[QueuedStep]
    ended: Ended


def _soft_limit(request: Any) -> float | None:
    """The message's soft time limit (the step's ``timeout_s``), or None."""
    limits = getattr(request, "timelimit", None) or (None, None)
    soft = limits[1] if len(limits) > 1 else None
    return float(soft) if soft else None


class AttemptRunner:
    """How this worker runs its steps' attempts; configured once when the worker starts."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.solo = False
        self.host: Any = None  # StepHost, for a solo worker
        self.grace: Any = None  # ShutdownGrace, once a shutdown signal came
        self._main_pid = os.getpid()
        self._stops: stop.ChildStops | None = None
        self._stops_pid = 0

    def configure(self, *, solo: bool, log_level: int) -> None:
        """Called in the worker's main process before it consumes (and before the fork)."""
        self.solo = solo
        self._main_pid = os.getpid()
        if solo and self.app.zw_settings.step_host:
            from zenml_workers.worker.stephost import StepHost
            from zenml_workers.worker.tasks import worker_context

            self.host = StepHost(
                self.app.zw_settings, worker_context(self.app).metadata, log_level=log_level
            )

    def start(self) -> None:
        """Warm the step host up at once, so the first step does not wait for its start."""
        if self.host is not None:
            self.host.start()

    def close(self) -> None:
        if self.host is not None:
            self.host.close()

    def _prefork_stops(self) -> stop.ChildStops | None:
        """This pool child's stop handlers (installed on its first step: billiard installs
        its own soft-timeout handler after the child starts)."""
        if os.getpid() == self._main_pid:
            return None  # solo without a step host, or a threads pool: nothing can stop it
        if self._stops is None or self._stops_pid != os.getpid():
            self._stops = stop.ChildStops(None).install(terminate_cancels=True)
            self._stops_pid = os.getpid()
        return self._stops

    def run(self, request: Any, task: StepTask, ctx: Any) -> Attempt:
        """Run one attempt of ``task`` for the Celery task of ``request``.

        Raises:
            InfrastructureError, UntrustedInputError, StoreMismatchError: as ``execute_step``.
        """
        from zenml_workers.worker.execute import execute_step

        task_id = getattr(request, "id", None)
        if self.host is not None:
            hosted = self.host.run(
                task,
                node=ctx.host,
                task_id=task_id,
                timeout_s=_soft_limit(request),
                hand_back_due=lambda: self.grace is not None and self.grace.due(),
            )
            if hosted.raised is not None:
                _raise_again(*hosted.raised)
                hosted_ended = how_it_ended(
                    ctx.metadata,
                    task,
                    [],
                    host=ctx.host,
                    pid=self.host.pid or -1,
                    task_id=task_id,
                )
                return Attempt([], hosted_ended)
            assert hosted.ended is not None
            return Attempt(hosted.follow, hosted.ended)
        stops = self._prefork_stops()
        if stops is None:
            follow = execute_step(task, ctx)
        else:
            timeout_s = _soft_limit(request)
            follow = stop.run_stoppable(
                task, ctx, stops, timeout_s=timeout_s, execute=execute_step
            ).follow
        ended = how_it_ended(
            ctx.metadata, task, follow, host=ctx.host, pid=os.getpid(), task_id=task_id
        )
        return Attempt(follow, ended)

    def record_hard_timeout(self, task: StepTask, ctx: Any, limit_s: float) -> list[QueuedStep]:
        """In the main process of a prefork worker whose child Celery just killed at its hard
        time limit: record the step's failure (retried if it has retries), which the child
        could not; returns the tasks to send."""
        grace = self.app.zw_settings.stop_grace_s
        timeout_s = max(0.0, limit_s - grace)
        return stop.settle_attempt(
            ctx.metadata,
            ctx.settings,
            task,
            host=ctx.host,
            pid=None,
            error="StepTimeoutError: "
            + stop.timeout_message(task.invocation_id, timeout_s or None, killed_after_s=grace),
        )


def _raise_again(kind: str, message: str) -> None:
    """Raise, in the worker process, what the step host's child raised and the task handles."""
    from stores.errors import InfrastructureError

    if kind == "untrusted":
        raise UntrustedInputError(message)
    if kind == "store_mismatch":
        raise StoreMismatchError(message)
    if kind == "infrastructure":
        raise InfrastructureError(message)
    log.warning("the step host's child raised out of a step: %s", message)


def end_task(task_self: Any, task: StepTask, ended: Ended) -> None:
    """End the Celery task as its attempt ended (after its follow-up tasks were sent).

    Raises:
        StepFailedError: the step failed (its failure is recorded and its retry, if any, is a
            new task): Celery marks the task FAILURE with it and acks the message.
        celery.exceptions.Ignore: the step was cancelled; a ``task-revoked`` event was sent
            first, so Flower shows REVOKED (a solo worker cannot be revoked while it runs).
        celery.exceptions.Reject: the step was handed back at shutdown: its message goes back
            to the broker for another worker.
    """
    from celery.exceptions import Ignore, Reject

    what = f"run {task.run_id} step {task.invocation_id}"
    if ended.outcome is Outcome.FAILED:
        raise StepFailedError(
            f"{what} failed: {ended.error}",
            run_id=task.run_id,
            step=task.invocation_id,
            remote_traceback=ended.traceback,
        )
    if ended.outcome is Outcome.CANCELLED:
        try:
            task_self.send_event("task-revoked", terminated=True, signum=None, expired=False)
        except Exception:  # only the monitor misses it; the step is cancelled in SQL
            log.warning("%s: could not send the task-revoked event", what, exc_info=True)
        raise Ignore()
    if ended.outcome is Outcome.HANDED_BACK:
        raise Reject(f"{what} handed back: its worker shuts down", requeue=True)
