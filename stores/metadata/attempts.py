"""A step attempt's life in SQL: claimed, completed or finished otherwise, taken over from a
dead process, its lease extended, stopped with its run, or found expired.

Like :mod:`stores.metadata.queries`, each function runs inside the caller's session, and
every status change is a guarded ``UPDATE`` naming its move of the state table.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from stores.metadata import statements as sql
from stores.metadata.models import StepRunRow
from stores.metadata.states import Move, StepStatus, sources, target

STEPS, RUNS = sql.STEPS, sql.RUNS


def claim(
    s: Session, step_run_id: str, *, host: str, pid: int, lease_s: float, now: float
) -> Row[Any] | None:
    """Start an attempt of a queued step whose run is still running; None if someone else has it."""
    return (
        s.connection()
        .execute(
            sql.CLAIM,
            {"_id": step_run_id, "now": now, "lease": now + lease_s, "host": host, "pid": pid},
        )
        .first()
    )


def complete_attempt(
    s: Session,
    step_run_id: str,
    attempt: int,
    *,
    ended_at: float,
    logs: str = "",
    step_metadata: dict[str, Any] | None = None,
    cache_expires_at: float | None = None,
) -> str | None:
    """Mark attempt ``attempt`` completed; returns the run's status, or None when the lease was lost.

    ``cache_expires_at`` (epoch seconds, None: never) ends the time its outputs are a cache hit.
    """
    return (
        s.connection()
        .execute(
            sql.COMPLETE,
            {
                "_id": step_run_id,
                "_attempt": attempt,
                "ended_at": ended_at,
                "logs": logs,
                "step_metadata": step_metadata,
                "expires_at": cache_expires_at,
            },
        )
        .scalar()
    )


def finish_attempt(s: Session, step_run_id: str, attempt: int, move: Move, **values: Any) -> bool:
    """End attempt ``attempt`` of a running step with ``move`` (retry, requeue or fail); False
    when its lease was lost to another attempt."""
    res = s.connection().execute(
        update(STEPS)
        .where(
            STEPS.c.id == step_run_id,
            STEPS.c.status.in_(sources(move)),
            STEPS.c.attempt == attempt,
        )
        .values(status=target(move), lease_expires_at=None, **values)
    )
    return res.rowcount == 1


def take_over(
    s: Session,
    step_run_id: str,
    dead_attempt: int,
    *,
    host: str,
    pid: int,
    lease_s: float,
    now: float,
    reason: str,
) -> Row[Any] | None:
    """Start a new attempt in place of ``dead_attempt``, whose worker is gone; None if another
    caller already moved the step on."""
    return (
        s.connection()
        .execute(
            sql.TAKE_OVER,
            {
                "_id": step_run_id,
                "_attempt": dead_attempt,
                "now": now,
                "lease": now + lease_s,
                "host": host,
                "pid": pid,
                "reason": reason,
            },
        )
        .first()
    )


def holder(s: Session, step_run_id: str) -> Any:
    """What a claim that failed needs to know of the step: its status, attempt, lease holder
    and attempt budget, and whether its run still runs."""
    return s.execute(
        select(
            STEPS.c.status,
            STEPS.c.attempt,
            STEPS.c.max_attempts,
            STEPS.c.worker_host,
            STEPS.c.worker_pid,
            RUNS.c.status.label("run_status"),
        )
        .join(RUNS, RUNS.c.id == STEPS.c.run_id)
        .where(STEPS.c.id == step_run_id)
    ).first()


def extend_lease(s: Session, step_run_id: str, attempt: int, until: float) -> bool:
    res = s.execute(
        update(StepRunRow)
        .where(
            StepRunRow.id == step_run_id,
            StepRunRow.status == StepStatus.RUNNING.value,
            StepRunRow.attempt == attempt,
        )
        .values(lease_expires_at=until)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def stop_steps(
    s: Session,
    run_id: str,
    move: Move,
    now: float,
    *,
    only: tuple[StepStatus, ...] | None = None,
) -> list[Row[Any]]:
    """Make ``move`` (skip or cancel) on every step of a run it may start from (narrowed to
    ``only``), dropping leases; return (id, task_id) of those steps."""
    return list(
        s.execute(
            update(STEPS)
            .where(STEPS.c.run_id == run_id, STEPS.c.status.in_(sources(move, only)))
            .values(status=target(move), ended_at=now, lease_expires_at=None)
            .returning(STEPS.c.id, STEPS.c.task_id)
        ).all()
    )


def expired_leases(s: Session, now: float) -> list[StepRunRow]:
    return list(
        s.execute(
            select(StepRunRow).where(
                StepRunRow.status == StepStatus.RUNNING.value, StepRunRow.lease_expires_at <= now
            )
        ).scalars()
    )
