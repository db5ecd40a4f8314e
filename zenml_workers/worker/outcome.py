"""How a step task's attempt ended, so that the broker's monitor (Flower) tells the truth.

``execute_step`` records every outcome in SQL and returns the follow-up tasks. The Celery
task ends accordingly (see :func:`zenml_workers.worker.tasks.report`): a failed attempt in
FAILURE with the step's exception, a cancelled one REVOKED, a handed-back one requeued.
Telling them apart costs one primary-key read, only for an attempt that queued no
successor (a leaf step, a failure, a dropped duplicate); a retry queued for the same step
says the attempt failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from scheduler.dispatch import QueuedStep
from scheduler.specs import StepTask
from stores.metadata.models import StepRunRow
from stores.metadata.states import StepStatus


class Outcome(StrEnum):
    """What a step task's attempt ended as."""

    COMPLETED = "completed"
    FAILED = "failed"  # the step raised (its retry, if any, is a new task)
    CANCELLED = "cancelled"
    HANDED_BACK = "handed_back"  # its worker shut down: the message goes back to the broker
    DROPPED = "dropped"  # a duplicate delivery, or a step whose run ended


@dataclass(frozen=True)
class Ended:
    """An attempt's outcome, with the step's exception and traceback when it failed."""

    outcome: Outcome
    error: str = ""
    traceback: str = ""


def how_it_ended(
    metadata: Any,
    task: StepTask,
    follow: Sequence[QueuedStep],
    *,
    host: str,
    pid: int,
    task_id: str | None,
) -> Ended:
    """The outcome of the attempt that process ``pid`` on node ``host`` ran for ``task``
    (delivered as Celery task ``task_id``), given the tasks it returned."""
    retried = any(f.task.step_run_id == task.step_run_id for f in follow)
    if follow and not retried:
        return Ended(Outcome.COMPLETED)
    with metadata.read() as s:
        row = s.get(StepRunRow, task.step_run_id)
        if row is None:
            return Ended(Outcome.DROPPED)
        status, by_it = row.status, row.worker_host == host and row.worker_pid == pid
        error, tb, row_task_id = row.exception or "", row.traceback or "", row.task_id
    if retried:
        return Ended(Outcome.FAILED, error, tb)
    if status == StepStatus.CANCELLED.value:
        return Ended(Outcome.CANCELLED)
    if status == StepStatus.QUEUED.value and task_id is not None and row_task_id == task_id:
        return Ended(Outcome.HANDED_BACK)
    if status == StepStatus.FAILED.value and by_it:
        return Ended(Outcome.FAILED, error, tb)
    if status == StepStatus.COMPLETED.value and by_it:
        return Ended(Outcome.COMPLETED)
    return Ended(Outcome.DROPPED)
