"""Recovering steps whose worker vanished and tasks the broker lost.

Pure functions of the SQL state and ``now``, so they are tested without
sleeping: write an expired lease, call :func:`recover` with a later ``now``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from scheduler import dispatch, outcomes
from scheduler.dispatch import QueuedStep
from scheduler.lease import LeasePolicy
from stores.metadata import attempts
from stores.metadata import queries as q
from stores.metadata import workers as w
from stores.metadata.states import Move

log = logging.getLogger("zenml_workers.scheduler")


@dataclass(frozen=True)
class RecoveryPolicy:
    """When recovery steps in. Units in seconds."""

    #: A queued step not claimed for this long is sent again (the claim drops duplicates).
    requeue_queued_after_s: float = 600.0
    #: Most of a run's steps on the broker at once.
    window: int = dispatch.DEFAULT_WINDOW
    #: Leases, heartbeats and the worker TTL.
    lease: LeasePolicy = field(default_factory=LeasePolicy)
    #: A step queued for longer is looked for on the broker, and resent if its message is gone.
    broker_check_after_s: float = 30.0
    #: How often the scheduler looks.
    broker_check_every_s: float = 15.0


def recover(
    s: Session,
    *,
    now: float,
    policy: RecoveryPolicy,
    judge_heartbeats: bool = False,
    resend_all_queued: bool = False,
    resend: Sequence[str] = (),
    events: Counter[str] | None = None,
) -> list[QueuedStep]:
    """Expire the leases of silent workers, requeue expired leases, resend stale queued steps,
    top up windows and close finished runs.

    Args:
        judge_heartbeats: the caller has read the store long enough to call a worker whose
            heartbeat is older than the TTL gone (see ``LeasePolicy.may_judge_heartbeats``).
        resend_all_queued: the broker lost its queues (it restarted empty): send every
            queued step again now.
        resend: step run ids whose message the broker lost (still queued ones are resent).
        events: counts what this pass did, by kind (``requeue``, ``resend``, ``silent_worker``:
            leases ended because their worker went silent, ``lost_worker_failure``), for the
            scheduler's metrics; ``flight_repair``: steps queued because the step they waited
            for ended without settling them.

    Returns the tasks to send once the caller commits.
    """
    out: list[QueuedStep] = []
    events = Counter() if events is None else events
    if judge_heartbeats:
        gone = w.silent_workers(s, heartbeat_before=policy.lease.silent_before(now))
        if gone:
            n = w.expire_leases_held_by(s, gone, now)
            events["silent_worker"] += n
            log.warning("workers %s are silent; expired %d lease(s)", ", ".join(gone), n)
    for row in attempts.expired_leases(s, now):
        if row.attempt < policy.lease.attempts_after_lost_worker(row.max_attempts):
            task_id = q.task_id(row.id, row.attempt + 1)
            if q.transition(
                s,
                row.id,
                Move.REQUEUE,
                queued_at=now,
                task_id=task_id,
                lease_expires_at=None,
                exception=f"attempt {row.attempt} lost its worker {row.worker_host} (lease expired)",
            ):
                log.warning(
                    "run %s step %s: lease expired on %s, requeued",
                    row.run_id,
                    row.invocation_id,
                    row.worker_host,
                )
                row.task_id = task_id
                events["requeue"] += 1
                out.append(dispatch.queued_step(s, row))
        elif outcomes.fail_lost_attempt(
            s,
            row.id,
            run_id=row.run_id,
            invocation_id=row.invocation_id,
            attempt=row.attempt,
            why=f"the worker running attempt {row.attempt} on {row.worker_host} vanished",
            now=now,
        ):
            events["lost_worker_failure"] += 1
            log.error(
                "run %s step %s: out of attempts after a lost worker", row.run_id, row.invocation_id
            )
    queued_before = now + 1 if resend_all_queued else now - policy.requeue_queued_after_s
    stale = {r.id: r for r in q.stale_queued(s, queued_before)}
    if resend and not resend_all_queued:
        stale.update((r.id, r) for r in q.queued_steps(s, resend))
    for row in stale.values():
        q.touch_queued(s, row.id, now)
        log.warning(
            "run %s step %s: queued %s, sent again",
            row.run_id,
            row.invocation_id,
            "but never sent"
            if row.queued_at == q.UNSENT
            else f"{now - (row.queued_at or now):.0f}s ago",
        )
        events["resend"] += 1
        out.append(dispatch.queued_step(s, row))
    # Waiting steps whose owner ended without settling them (e.g. it was deleted): one
    # query over the waiting rows only.
    repaired = outcomes.repair_flights(s, now=now, window=policy.window)
    events["flight_repair"] += len(repaired)
    out.extend(repaired)
    for run in q.running_runs(s):
        if not dispatch.finish_run_if_done(s, run.id, now=now):
            out.extend(dispatch.fill_window(s, run.id, window=policy.window, now=now))
    return out
