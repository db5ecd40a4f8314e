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
    broker window, ``queued`` is on the broker, ``running`` holds a lease. ``waiting``
    waits for another step run with the same cache key to commit (single-flight, see
    ``step_runs.waits_for``): it is not on the broker and holds no lease.
    """

    PENDING = "pending"
    READY = "ready"
    WAITING = "waiting"
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


class Move(StrEnum):
    """Every way a step run's status may change. Each guarded ``UPDATE`` names its move and takes
    its ``WHERE status IN (...)`` from :data:`MOVES`, so no statement can make another change."""

    SETTLE_READY = "settle_ready"  # all inputs exist, no cache hit
    SETTLE_CACHED = "settle_cached"  # all inputs exist, outputs linked from a cache hit
    SETTLE_WAIT = "settle_wait"  # all inputs exist, the same cache key is being computed elsewhere
    LAND = "land"  # the step it waited for committed: its outputs are linked (cached)
    TAKE_FLIGHT = "take_flight"  # the step it waited for ended without outputs: it computes
    QUEUE = "queue"  # into the run's broker window
    RESEND = "resend"  # the same attempt sent again (lost message); restarts its clock
    CLAIM = "claim"  # a worker starts an attempt
    TAKE_OVER = "take_over"  # the attempt's worker is provably dead: a new attempt starts here
    COMPLETE = "complete"
    RETRY = "retry"  # the step raised and has attempts left
    REQUEUE = "requeue"  # the attempt's lease expired or its worker is gone
    HAND_BACK = "hand_back"  # its worker shut down before it finished: queued again, uncounted
    FAIL = "fail"
    SKIP = "skip"  # the run failed before the step started
    CANCEL = "cancel"


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

#: Steps that are not finished and may still be started; cancelled or skipped when the run ends early.
UNSTARTED = (StepStatus.PENDING, StepStatus.READY, StepStatus.WAITING, StepStatus.QUEUED)

_S = StepStatus
#: The state table: each move, the statuses it may start from, and the status it ends in.
MOVES: dict[Move, tuple[frozenset[StepStatus], StepStatus]] = {
    Move.SETTLE_READY: (frozenset({_S.PENDING}), _S.READY),
    Move.SETTLE_CACHED: (frozenset({_S.PENDING}), _S.CACHED),
    Move.SETTLE_WAIT: (frozenset({_S.PENDING}), _S.WAITING),
    Move.LAND: (frozenset({_S.WAITING}), _S.CACHED),
    Move.TAKE_FLIGHT: (frozenset({_S.WAITING}), _S.READY),
    Move.QUEUE: (frozenset({_S.READY}), _S.QUEUED),
    Move.RESEND: (frozenset({_S.QUEUED}), _S.QUEUED),
    Move.CLAIM: (frozenset({_S.QUEUED}), _S.RUNNING),
    Move.TAKE_OVER: (frozenset({_S.RUNNING}), _S.RUNNING),
    Move.COMPLETE: (frozenset({_S.RUNNING}), _S.COMPLETED),
    Move.RETRY: (frozenset({_S.RUNNING}), _S.QUEUED),
    Move.REQUEUE: (frozenset({_S.RUNNING}), _S.QUEUED),
    Move.HAND_BACK: (frozenset({_S.RUNNING}), _S.QUEUED),
    Move.FAIL: (frozenset({_S.RUNNING}), _S.FAILED),
    Move.SKIP: (frozenset(UNSTARTED), _S.SKIPPED),
    Move.CANCEL: (frozenset({*UNSTARTED, _S.RUNNING}), _S.CANCELLED),
}

#: Allowed step transitions, derived from :data:`MOVES` (terminal statuses have none).
STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    st: frozenset(dst for src, dst in MOVES.values() if st in src) for st in StepStatus
}


def sources(move: Move, only: tuple[StepStatus, ...] | None = None) -> list[str]:
    """The status values ``move`` may start from, for a statement's ``WHERE status IN (...)``.

    ``only`` narrows them (e.g. cancel only the running steps).

    Raises:
        ValueError: ``only`` names a status that ``move`` may not start from (a programming error).
    """
    src, _ = MOVES[move]
    if only is not None:
        bad = [st for st in only if st not in src]
        if bad:
            raise ValueError(f"move {move.value} cannot start from step status {bad[0].value}")
        src = frozenset(only)
    return sorted(st.value for st in src)


def target(move: Move) -> str:
    """The status value ``move`` ends in."""
    return MOVES[move][1].value
