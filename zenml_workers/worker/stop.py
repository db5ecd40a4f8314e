"""Stopping a step that runs in a child process: cancel, ``timeout_s`` and shutdown hand-back.

A supervisor (a solo worker's step host, the embedded pool, a worker's shutdown grace)
asks a child to stop with a signal, and the child's handler raises inside the running step:

- :class:`~zenml_workers.errors.StepTimeoutError` when the step ran past its ``timeout_s``:
  an ordinary exception, so ``execute_step`` records it as the step's failure and retries it
  if it has retries left;
- :class:`StepStopped` when the attempt is no longer the child's (its run was cancelled,
  another attempt superseded it, its worker handed it back): a ``BaseException``, so a
  step's own ``except Exception`` does not swallow it. The supervisor moved the row first,
  so whatever ``execute_step`` then tries to record is refused by the guarded ``UPDATE``\\s.

A child that still runs ``ZW_STOP_GRACE_S`` after the request is killed (SIGKILL), and its
supervisor records what the child could not (:func:`settle_attempt`). Each request raises at
most once per attempt: a step that catches it is killed later, not interrupted again.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from scheduler import dispatch, outcomes
from scheduler.backoff import retry_delay_s
from scheduler.dispatch import QueuedStep
from scheduler.specs import StepTask
from stores.metadata import workers as w
from stores.metadata.models import StepRunRow
from stores.metadata.states import StepStatus
from stores.metadata.store import MetadataStore
from zenml_workers.errors import StepTimeoutError
from zenml_workers.settings import Settings

log = logging.getLogger("zenml_workers.worker")

#: A supervisor's request to the child; what is asked is in the child's :class:`StopBox`
#: (without one, in a prefork child, it is billiard's soft time limit: ``timeout_s``).
SOFT_STOP = signal.SIGUSR1
#: The worker's shutdown grace ended and the child's attempt was handed back.
HAND_BACK = signal.SIGUSR2

#: Why a stop was asked.
TIMEOUT, CANCEL, SUPERSEDED, HANDED_BACK = "timeout", "cancel", "superseded", "handback"


class StepStopped(BaseException):  # noqa: N818 - a control-flow signal, like SystemExit
    """Raised inside a step whose attempt is no longer its process's: cancelled, superseded
    or handed back (``reason``). A ``BaseException``, so a step's ``except Exception``
    does not swallow it; never recorded as the step's failure (the row moved first)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- the child's side -------------------------------------------------------------------------


class StopBox:
    """Shared memory in which a supervisor writes what it asks of one child, before signalling
    it: ``"<reason> <step run id>"``. Made by the supervisor, handed to the child at start."""

    SIZE = 200

    def __init__(self, mp_context: Any) -> None:
        self._buf = mp_context.Array("c", self.SIZE, lock=False)

    def ask(self, reason: str, step_run_id: str) -> None:
        self._buf.value = f"{reason} {step_run_id}".encode()[: self.SIZE - 1]

    def read(self) -> tuple[str, str]:
        reason, _, step_run_id = bytes(self._buf.value).decode(errors="replace").partition(" ")
        return reason, step_run_id


@dataclass(frozen=True)
class Armed:
    """The attempt a child is running now, which a stop request may interrupt."""

    step_run_id: str
    invocation_id: str
    timeout_s: float | None = None


class _Body:
    """Whether this process's main thread runs a step's own code now, and a stop that came
    while it did not (claiming, loading inputs): raised as the body starts."""

    inside = False
    pending: BaseException | None = None


_BODY = _Body()


@contextmanager
def step_body() -> Iterator[None]:
    """Around the step's own code: the only place where a stop request raises.

    Raising anywhere else could interrupt a metadata-store transaction half way (SQLite's
    write lock held by a connection nobody closes) or an artifact write; a request that lands
    there waits for the body (and is dropped once the body has run: the commit's guarded
    UPDATE refuses a cancelled or superseded attempt).
    """
    pending, _BODY.pending = _BODY.pending, None
    if pending is not None:
        raise pending
    _BODY.inside = True
    try:
        yield
    finally:
        _BODY.inside = False


def _deliver(stop: BaseException) -> None:
    if _BODY.inside:
        raise stop
    _BODY.pending = stop


class ChildStops:
    """The stop signals' handlers of one child process (install once, then arm per attempt).

    Outside an attempt (``armed`` is None), and for a request naming another attempt than the
    armed one (a late request for the previous step), the signals are ignored.
    """

    def __init__(self, box: StopBox | None) -> None:
        self.box = box
        self.armed: Armed | None = None

    def install(self, *, terminate_cancels: bool = False) -> ChildStops:
        """Install the handlers; with ``terminate_cancels`` (a prefork pool child, which
        Celery's ``revoke(terminate=True)`` sends SIGTERM) SIGTERM during an attempt exits the
        process from the step's body, never from inside a transaction, and exits an idle
        process as billiard would."""
        signal.signal(SOFT_STOP, self._on_soft_stop)
        signal.signal(HAND_BACK, self._on_hand_back)
        if terminate_cancels:
            self._exit_handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_terminate)
        return self

    def arm(self, armed: Armed | None) -> None:
        """Mark the attempt now running (None: none); a stop pending from another is dropped."""
        self.armed = armed
        _BODY.pending = None

    def _on_terminate(self, signum: int, frame: Any) -> None:
        if self.armed is None:
            previous = getattr(self, "_exit_handler", None)
            if callable(previous):
                previous(signum, frame)  # billiard's: exit the idle process
                return
            raise SystemExit(-(256 - signum))
        # Exit as billiard would, but from the step's body only (a process that dies releases
        # every lock; one that lived on after an interrupted transaction would hold SQLite's).
        # A second SIGTERM kills at once.
        self.armed = None
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _deliver(SystemExit(-(256 - signum)))

    def _on_soft_stop(self, _signum: int, _frame: Any) -> None:
        armed = self.armed
        if armed is None:
            return
        if self.box is None:
            reason = TIMEOUT  # a prefork child: billiard's soft time limit fired
        else:
            reason, step_run_id = self.box.read()
            if step_run_id != armed.step_run_id:
                return
        self.armed = None  # once per attempt: a step that swallows it is killed later
        if reason == TIMEOUT:
            _deliver(StepTimeoutError(timeout_message(armed.invocation_id, armed.timeout_s)))
            return
        _deliver(StepStopped(reason, f"step {armed.invocation_id!r} was stopped ({reason})"))

    def _on_hand_back(self, _signum: int, _frame: Any) -> None:
        armed = self.armed
        if armed is None:
            return
        self.armed = None
        _deliver(
            StepStopped(
                HANDED_BACK, f"step {armed.invocation_id!r} was handed back: its worker shuts down"
            )
        )


def timeout_message(
    invocation_id: str, timeout_s: float | None, *, killed_after_s: float = -1
) -> str:
    """The failure recorded for a step past its ``timeout_s`` (``killed_after_s``: the grace
    after which its process was killed because it did not stop)."""
    limit = f"{timeout_s:g} s" if timeout_s else "?"
    text = f"step {invocation_id!r} ran past its timeout_s of {limit}"
    if killed_after_s >= 0:
        text += (
            f" and was killed {killed_after_s:g} s later (ZW_STOP_GRACE_S) because it did "
            "not stop; a step that catches exceptions broadly should re-raise StepTimeoutError"
        )
    return text


@dataclass(frozen=True)
class Ran:
    """An attempt run under :func:`run_stoppable`: the tasks to send, and why it was stopped
    (``stopped``: one of the reasons above), if it was."""

    follow: list[QueuedStep]
    stopped: str | None = None


def run_stoppable(
    task: StepTask,
    ctx: Any,
    stops: ChildStops,
    *,
    timeout_s: float | None,
    execute: Callable[[StepTask, Any], list[QueuedStep]],
) -> Ran:
    """Run ``execute(task, ctx)`` (``execute_step``) so that a stop request interrupts it.

    A request that lands outside the step's body (while claiming, or after the commit,
    where ``execute_step`` does not catch it) escapes: the attempt's row says what landed,
    and :func:`settle_attempt` does what is left (e.g. sends the successors a commit queued).
    """
    stops.arm(Armed(task.step_run_id, task.invocation_id, timeout_s))
    follow: list[QueuedStep] | None = None
    try:
        try:
            follow = execute(task, ctx)
        finally:
            stops.arm(None)
    except StepStopped as e:
        return Ran(follow or [], e.reason)
    except StepTimeoutError as e:
        if follow is None:
            follow = settle_attempt(
                ctx.metadata,
                ctx.settings,
                task,
                host=ctx.host,
                pid=os.getpid(),
                error=f"StepTimeoutError: {e}",
            )
        return Ran(follow, TIMEOUT)
    return Ran(follow)


def step_timeout(task: StepTask, ctx: Any) -> float | None:
    """The step's ``timeout_s`` from its run's spec (cached per process; the claim reads the
    same spec, so a first read here costs the claim nothing)."""
    entry = dispatch.SPECS.cached(task.run_id)
    if entry is None:
        with ctx.metadata.read() as s:
            entry = dispatch.SPECS.get(s, task.run_id)
    step = entry[1].get(task.invocation_id)
    return step.timeout_s if step is not None else None


# -- the supervisor's side ----------------------------------------------------------------------


@dataclass
class StepWatch:
    """What a supervisor knows of one attempt running in one child process (monotonic times)."""

    step_run_id: str
    invocation_id: str
    pid: int
    started_at: float
    timeout_s: float | None = None
    #: The attempt number, learnt from its row once the child claimed it.
    attempt: int | None = None
    #: Why a stop was asked, and when.
    reason: str | None = None
    asked_at: float | None = None

    def timed_out(self, now: float) -> bool:
        """Past its ``timeout_s`` and not yet asked to stop."""
        return (
            bool(self.timeout_s)
            and self.reason is None
            and now >= self.started_at + float(self.timeout_s or 0)
        )

    def kill_due(self, now: float, grace_s: float) -> bool:
        """Asked to stop ``grace_s`` ago or more, and still running."""
        return self.asked_at is not None and now >= self.asked_at + grace_s

    def next_due(self, grace_s: float) -> float | None:
        """When this watch next needs a look (its timeout or its kill), monotonic; None: never."""
        if self.asked_at is not None:
            return self.asked_at + grace_s
        if self.timeout_s:
            return self.started_at + self.timeout_s
        return None

    def judge(self, state: w.AttemptState | None, host: str) -> str | None:
        """Why SQL says this attempt is no longer the child's (:data:`CANCEL`,
        :data:`SUPERSEDED`), or None. Remembers the attempt number once the child claimed."""
        if state is None or self.reason is not None:
            return None
        if state.status == StepStatus.CANCELLED.value:
            return CANCEL
        ours = state.worker_host == host and state.worker_pid == self.pid
        if state.status == StepStatus.RUNNING.value and ours and self.attempt is None:
            self.attempt = state.attempt
        if self.attempt is not None and state.attempt > self.attempt:
            return SUPERSEDED  # a later attempt was claimed elsewhere: this one cannot commit
        # Anything else is the child's own doing (its commit, its retry) or the scheduler's
        # requeue, whose refused commit costs nothing: interrupting it could lose its tasks.
        return None


def watch_states(metadata: MetadataStore, watches: list[StepWatch]) -> dict[str, w.AttemptState]:
    """The rows of the watched attempts (one query)."""
    with metadata.read() as s:
        return w.attempt_states(s, [wt.step_run_id for wt in watches])


def settle_attempt(
    metadata: MetadataStore,
    settings: Settings,
    task: StepTask,
    *,
    host: str,
    pid: int | None,
    error: str,
    retry_allowed: bool = True,
    resend_unclaimed: bool = False,
) -> list[QueuedStep]:
    """Do what an attempt that ended abnormally (killed, died, or interrupted outside its
    body) left undone, as its row says; returns the tasks to send.

    - still running under ``host`` and ``pid`` (any pid when None): record ``error`` as its
      failure, retried if ``retry_allowed`` and it has attempts left;
    - committed by it: the successors its commit queued (their tasks may never have left);
    - queued again by it (a retry it recorded): its retry task;
    - queued and never claimed: its task again, with ``resend_unclaimed``;
    - anything else (cancelled, failed, another process's attempt): nothing.
    """
    now = time.time()
    with metadata.transaction() as s:
        row = s.get(StepRunRow, task.step_run_id)
        if row is None:
            return []
        by_it = row.worker_host == host and (pid is None or row.worker_pid == pid)
        if row.status == StepStatus.RUNNING.value and by_it:
            follow = outcomes.step_failed(
                s,
                row,
                attempt=row.attempt,
                error=error,
                traceback="",
                values={},
                now=now,
                retry_delay_s=retry_delay_s(row.attempt, settings.retry_delay_s),
                retry_allowed=retry_allowed,
            )
            log.warning(
                "run %s step %s attempt %d: %s", row.run_id, row.invocation_id, row.attempt, error
            )
            return follow or []
        if row.status == StepStatus.COMPLETED.value and by_it and row.ended_at is not None:
            return outcomes.committed_earlier(s, row, attempt=row.attempt, now=row.ended_at) or []
        if row.status == StepStatus.QUEUED.value and (by_it or resend_unclaimed):
            wait_s = max(0.0, (row.queued_at or now) - now)
            return [replace(dispatch.queued_step(s, row), delay_s=wait_s)]
    return []
