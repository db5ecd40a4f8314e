"""How a step attempt ends, inside the transaction that records it: committed (its waiters
settled, its run moved on), failed (retried, or the run failed), lost, or its run cancelled;
and the flights that pass to waiting steps when their owner ends without outputs.

Like :mod:`scheduler.dispatch`, each function returns the step tasks to send after commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy.orm import Session

from scheduler import decisions, flight
from scheduler.dispatch import (
    DEFAULT_WINDOW,
    SPECS,
    QueuedStep,
    fill_window,
    queued_step,
    resolve,
)
from stores.metadata import attempts, flights
from stores.metadata import logs as step_logs
from stores.metadata import queries as q
from stores.metadata.states import UNSTARTED, Move, RunStatus, StepStatus

LOG_LINES = "log_lines"


def _split_log_lines(values: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The column values, and the log lines to store with them (None when there are none)."""
    if LOG_LINES not in values:
        return values, None
    rest = dict(values)
    return rest, rest.pop(LOG_LINES)


def step_succeeded(
    s: Session,
    row: Any,
    *,
    attempt: int,
    artifacts: Sequence[dict[str, Any]],
    edges: Sequence[dict[str, Any]],
    values: dict[str, Any],
    window: int = DEFAULT_WINDOW,
    now: float,
    verify: decisions.Verify | None = None,
) -> list[QueuedStep] | None:
    """Commit a successful attempt and move the run on; None when the attempt had lost its lease.

    The steps waiting for this one (same cache key, other runs) are settled as cached from it
    in the same transaction, and their runs move on too; ``verify`` checks the objects of the
    cache hits that the downstream steps get (see :data:`decisions.Verify`).
    """
    values, log_lines = _split_log_lines(values)
    _, by_id, downstream = SPECS.get(s, row.run_id)
    expires_s = by_id[row.invocation_id].cache_expires_after_s
    run_status = attempts.complete_attempt(
        s,
        row.id,
        attempt,
        ended_at=now,
        cache_expires_at=None if expires_s is None else now + expires_s,
        **values,
    )
    if run_status is None:
        return None
    step_logs.store(s, row.id, attempt, log_lines)
    q.add_artifacts(s, artifacts)
    q.add_lineage(s, edges)
    outputs = {
        a["name"]: q.ArtifactRef(
            a["id"], a["content_hash"], a["uri"], a["materializer"], a["data_type"]
        )
        for a in artifacts
    }
    landed: list[QueuedStep] = []
    if by_id[row.invocation_id].enable_cache and SPECS.flies(s, row.run_id):
        # Before the run's own status matters: a failed run's finished step still serves
        # the steps that waited for it.
        landed = _land_waiters(s, row, outputs, window=window, now=now, verify=verify)
    if run_status != RunStatus.RUNNING.value:
        return landed
    unblocked = q.decrement_deps(s, row.run_id, downstream[row.invocation_id])
    known = {(row.invocation_id, name): ref for name, ref in outputs.items()}
    return landed + resolve(
        s,
        row.run_id,
        unblocked,
        window=window,
        now=now,
        known=known,
        leaf=not downstream[row.invocation_id],
        verify=verify,
    )


def _land_waiters(
    s: Session,
    owner: Any,
    outputs: dict[str, q.ArtifactRef],
    *,
    window: int,
    now: float,
    verify: decisions.Verify | None = None,
) -> list[QueuedStep]:
    """Settle the steps waiting for ``owner`` (just committed) as cached from it, linking its
    outputs (no copies), and move their runs on as after a cache hit."""
    rows = flights.land(s, owner.id, owner.run_id, now=now)
    by_run: dict[str, list[Any]] = {}
    for r in rows:
        by_run.setdefault(r.run_id, []).append(r)
    hit = q.CacheHit(owner.id, owner.run_id, now, outputs)
    out: list[QueuedStep] = []
    for run_id in sorted(by_run):
        _, by_id, downstream = SPECS.get(s, run_id)
        waiting = by_run[run_id]
        upstream = {r.step for w in waiting for i in by_id[w.invocation_id].inputs for r in i.refs}
        produced = q.output_artifacts(s, run_id, upstream)
        edges: list[dict[str, Any]] = []
        unblocked: list[Any] = []
        for w in waiting:
            edges += decisions.link_hit(by_id[w.invocation_id], w.id, run_id, hit, produced)
        q.add_lineage(s, edges)
        for w in waiting:  # one by one: two waiters may share a downstream step
            unblocked += q.decrement_deps(s, run_id, downstream[w.invocation_id])
        out += resolve(s, run_id, unblocked, window=window, now=now, known=produced, verify=verify)
    return out


def step_failed(
    s: Session,
    row: Any,
    *,
    attempt: int,
    error: str,
    traceback: str,
    values: dict[str, Any],
    now: float,
    retry_allowed: bool = True,
    retry_delay_s: float = 0.0,
) -> list[QueuedStep] | None:
    """Record a failed attempt: requeue it while attempts remain, else fail the run.

    Returns the retry task to send (to start after ``retry_delay_s``), ``[]`` when the run
    failed, None when the attempt had lost its lease.
    """
    values, log_lines = _split_log_lines(values)
    if retry_allowed and attempt < row.max_attempts:
        task_id = q.task_id(row.id, attempt + 1)
        if not attempts.finish_attempt(
            s,
            row.id,
            attempt,
            Move.RETRY,
            # Its clock starts when it may start: recovery must not resend it while it waits.
            queued_at=now + retry_delay_s,
            task_id=task_id,
            exception=error,
            traceback=traceback,
            **values,
        ):
            return None
        step_logs.store(s, row.id, attempt, log_lines)
        retry = q.QueuedRow(
            row.id, row.run_id, row.invocation_id, row.step_name, row.queue, task_id
        )
        return [replace(queued_step(s, retry), delay_s=retry_delay_s)]
    if not attempts.finish_attempt(
        s,
        row.id,
        attempt,
        Move.FAIL,
        ended_at=now,
        exception=error,
        traceback=traceback,
        **values,
    ):
        return None
    step_logs.store(s, row.id, attempt, log_lines)
    # A step waiting for this one (same cache key, another run) takes over: its task is sent.
    return fail_run(
        s, row.run_id, f"step {row.invocation_id!r} failed: {error}", now=now, ended=[row.id]
    )


def committed_earlier(s: Session, row: Any, *, attempt: int, now: float) -> list[QueuedStep] | None:
    """After a commit whose outcome was unknown (the connection broke during ``COMMIT``): the
    tasks that commit queued at ``now`` if it did land, so they are sent; None if it did not
    (the attempt really lost its lease)."""
    current = attempts.holder(s, row.id)
    if (
        current is None
        or current.status != StepStatus.COMPLETED.value
        or current.attempt != attempt
    ):
        return None
    return [queued_step(s, r) for r in q.queued_at(s, row.run_id, now)]


def fail_lost_attempt(
    s: Session,
    step_run_id: str,
    *,
    run_id: str,
    invocation_id: str,
    attempt: int,
    why: str,
    now: float,
) -> bool:
    """Fail a step whose workers kept dying (out of attempts) and with it the run."""
    if not attempts.finish_attempt(
        s, step_run_id, attempt, Move.FAIL, ended_at=now, exception=f"WorkerLostError: {why}"
    ):
        return False
    # A step that waited for this one becomes ready; the scheduler's pass queues it.
    fail_run(
        s,
        run_id,
        f"step {invocation_id!r} lost its worker {attempt} times: {why}",
        now=now,
        ended=[step_run_id],
    )
    return True


def fail_run(
    s: Session,
    run_id: str,
    message: str,
    *,
    now: float,
    ended: Sequence[str] = (),
    window: int = DEFAULT_WINDOW,
) -> list[QueuedStep]:
    """Fail a run and skip its steps that have not started (running ones finish but move nothing on).

    The flights of the skipped steps and of ``ended`` (step runs that just failed) pass to
    steps of other runs waiting for them; returns those steps' tasks to send.
    """
    stopped: list[str] = []
    if q.set_run_status(s, run_id, RunStatus.FAILED, now=now, message=message):
        stopped = [r.id for r in attempts.stop_steps(s, run_id, Move.SKIP, now)]
    return take_flights(s, [*ended, *stopped], now=now, window=window)


def take_flights(
    s: Session, ended: Sequence[str], *, now: float, window: int = DEFAULT_WINDOW
) -> list[QueuedStep]:
    """Hand the flights of step runs that ended without outputs to steps waiting for them
    (:func:`scheduler.flight.hand_over`) and queue those; returns their tasks."""
    out: list[QueuedStep] = []
    for run_id in sorted(flight.hand_over(s, ended, now=now)):
        out += fill_window(s, run_id, window=window, now=now)
    return out


def cancel_run(s: Session, run_id: str, *, now: float) -> tuple[list[str], list[str]]:
    """Cancel a running run; return the task ids of its (queued, running) attempts, to revoke.

    Steps of other runs waiting for its steps (same cache key) take over: they become ready,
    and the scheduler's next pass queues them. Its own waiting steps just end.
    """
    if not q.set_run_status(s, run_id, RunStatus.CANCELLED, now=now, message="cancelled by user"):
        return [], []
    unstarted = attempts.stop_steps(s, run_id, Move.CANCEL, now, only=UNSTARTED)
    running = attempts.stop_steps(s, run_id, Move.CANCEL, now, only=(StepStatus.RUNNING,))
    flight.hand_over(s, [r.id for r in [*unstarted, *running]], now=now)
    return [r.task_id for r in unstarted if r.task_id], [r.task_id for r in running if r.task_id]


def repair_flights(s: Session, *, now: float, window: int = DEFAULT_WINDOW) -> list[QueuedStep]:
    """Settle waiting steps whose owner finished or vanished without settling them (the
    scheduler's pass; one query by the status index when there are none): cached from an
    owner that completed, else one of them takes over. Returns the tasks to send."""
    out: list[QueuedStep] = []
    dead: list[str] = []
    for owner_id, orphans in _by_owner(flights.orphans(s)).items():
        first = orphans[0]
        if first.owner_status == StepStatus.COMPLETED.value:
            key = (first.owner_invocation_id,)
            outputs = {
                name: ref
                for (_, name), ref in q.output_artifacts(s, first.owner_run_id, key).items()
            }
            owner = q.QueuedRow(owner_id, first.owner_run_id, key[0], "", "", "")
            out += _land_waiters(s, owner, outputs, window=window, now=now)
        else:
            dead.append(owner_id)
    return out + take_flights(s, dead, now=now, window=window)


def _by_owner(rows: Sequence[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in rows:
        out.setdefault(r.waits_for, []).append(r)
    return out
