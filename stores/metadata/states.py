"""Run and step-run states, with the transitions the scheduler may make."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """State of a pipeline run."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL_RUN


class StepStatus(StrEnum):
    """State of one step invocation inside a run.

    ``pending`` waits on upstream steps, ``ready`` waits for a slot in the run's
    broker window, ``queued`` is on the broker, ``running`` holds a lease.
    """

    PENDING = "pending"
    READY = "ready"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CACHED = "cached"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL_STEP

    def can_become(self, other: StepStatus) -> bool:
        return other in STEP_TRANSITIONS[self]


_TERMINAL_RUN = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
_TERMINAL_STEP = frozenset(
    {
        StepStatus.COMPLETED,
        StepStatus.CACHED,
        StepStatus.FAILED,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
    }
)

#: Allowed step transitions. ``running -> queued`` is a retry or a requeue after a lost lease.
STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset(
        {StepStatus.READY, StepStatus.CACHED, StepStatus.SKIPPED, StepStatus.CANCELLED}
    ),
    StepStatus.READY: frozenset({StepStatus.QUEUED, StepStatus.SKIPPED, StepStatus.CANCELLED}),
    StepStatus.QUEUED: frozenset({StepStatus.RUNNING, StepStatus.SKIPPED, StepStatus.CANCELLED}),
    StepStatus.RUNNING: frozenset(
        {
            StepStatus.COMPLETED,
            StepStatus.FAILED,
            StepStatus.QUEUED,
            StepStatus.CANCELLED,
            StepStatus.SKIPPED,
        }
    ),
    StepStatus.COMPLETED: frozenset(),
    StepStatus.CACHED: frozenset(),
    StepStatus.FAILED: frozenset(),
    StepStatus.SKIPPED: frozenset(),
    StepStatus.CANCELLED: frozenset(),
}

#: Steps that are not finished and may still be started; cancelled or skipped when the run ends early.
UNSTARTED = (StepStatus.PENDING, StepStatus.READY, StepStatus.QUEUED)
