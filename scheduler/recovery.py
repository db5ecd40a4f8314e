"""Recovering steps whose worker vanished and tasks the broker lost.

Pure functions of the SQL state and ``now``, so they are tested without
sleeping: write an expired lease, call :func:`recover` with a later ``now``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from scheduler import dispatch
from scheduler.dispatch import QueuedStep
from stores.metadata import queries as q
from stores.metadata.states import StepStatus

log = logging.getLogger("zenml_workers.scheduler")


@dataclass(frozen=True)
class RecoveryPolicy:
    """When recovery steps in. Units in seconds."""

    #: A queued step not claimed for this long is sent again (the claim drops duplicates).
    requeue_queued_after_s: float = 600.0
    #: Most of a run's steps on the broker at once.
    window: int = dispatch.DEFAULT_WINDOW


def recover(s: Session, *, now: float, policy: RecoveryPolicy) -> list[QueuedStep]:
    """Requeue expired leases, resend stale queued steps, top up windows and close finished runs.

    Returns the tasks to send once the caller commits.
    """
    out: list[QueuedStep] = []
    for row in q.expired_leases(s, now):
        # A lost worker costs an attempt, but a step always gets one redelivery.
        if row.attempt < max(row.max_attempts, 2):
            task_id = q.task_id(row.id, row.attempt + 1)
            if q.transition(
                s,
                row.id,
                StepStatus.RUNNING,
                StepStatus.QUEUED,
                queued_at=now,
                task_id=task_id,
                lease_expires_at=None,
                exception=f"attempt {row.attempt} lost its worker (lease expired)",
            ):
                log.warning(
                    "run %s step %s: lease expired on %s, requeued",
                    row.run_id,
                    row.invocation_id,
                    row.worker_host,
                )
                row.task_id = task_id
                out.append(dispatch.queued_step(s, row))
        elif q.finish_attempt(
            s,
            row.id,
            row.attempt,
            StepStatus.FAILED,
            ended_at=now,
            exception=f"WorkerLostError: the worker running attempt {row.attempt} on {row.worker_host} vanished",
        ):
            log.error(
                "run %s step %s: out of attempts after a lost worker", row.run_id, row.invocation_id
            )
            dispatch.fail_run(
                s,
                row.run_id,
                f"step {row.invocation_id!r} lost its worker {row.attempt} times",
                now=now,
            )
    for row in q.stale_queued(s, now - policy.requeue_queued_after_s):
        q.touch_queued(s, row.id, now)
        log.warning(
            "run %s step %s: queued but unclaimed since %.0fs, sent again",
            row.run_id,
            row.invocation_id,
            now - (row.queued_at or now),
        )
        out.append(dispatch.queued_step(s, row))
    for run in q.running_runs(s):
        if not dispatch.finish_run_if_done(s, run.id, now=now):
            out.extend(dispatch.fill_window(s, run.id, window=policy.window, now=now))
    return out
