"""Statements on workers and the leases of their steps, each inside a caller's session.

A worker's row (its node name, queues, pid and last heartbeat) tells the scheduler which
queues some live worker consumes and which workers went silent. The leases of a silent or
restarted worker, or of its dead pool processes, are only ended here (set to ``now``):
the next recovery pass requeues or fails those steps with the guarded transitions of
:mod:`stores.metadata.queries`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from stores.metadata.models import StepRunRow, WorkerRow
from stores.metadata.states import StepStatus

# -- heartbeats -----------------------------------------------------------------------------


def worker_heartbeat(
    s: Session, *, name: str, queues: list[str], host: str, pid: int, now: float
) -> None:
    row = s.get(WorkerRow, name)
    if row is None:
        s.add(
            WorkerRow(
                name=name, queues=queues, host=host, pid=pid, started_at=now, heartbeat_at=now
            )
        )
    else:
        row.queues, row.host, row.pid, row.heartbeat_at, row.stopped = queues, host, pid, now, False


def worker_stopped(s: Session, name: str) -> None:
    s.execute(update(WorkerRow).where(WorkerRow.name == name).values(stopped=True))


def live_queues(s: Session, *, now: float, max_age_s: float) -> set[str]:
    """Queues consumed by a worker whose heartbeat is younger than ``max_age_s``."""
    rows = s.execute(
        select(WorkerRow.queues).where(
            WorkerRow.stopped.is_(False), WorkerRow.heartbeat_at >= now - max_age_s
        )
    ).scalars()
    return {q for queues in rows for q in queues}


def forget_workers(s: Session, older_than: float) -> None:
    s.execute(delete(WorkerRow).where(WorkerRow.heartbeat_at < older_than))


# -- leases of silent and restarted workers -------------------------------------------------


def silent_workers(s: Session, *, heartbeat_before: float) -> list[str]:
    """Node names of workers that said they stopped or last beat before ``heartbeat_before``,
    while some running step is attributed to them."""
    held = select(StepRunRow.worker_host).where(StepRunRow.status == StepStatus.RUNNING.value)
    return list(
        s.execute(
            select(WorkerRow.name).where(
                WorkerRow.name.in_(held),
                (WorkerRow.stopped.is_(True)) | (WorkerRow.heartbeat_at < heartbeat_before),
            )
        ).scalars()
    )


def expire_leases_held_by(
    s: Session, workers: Sequence[str], now: float, *, started_before: float | None = None
) -> int:
    """End the leases of every running step attributed to these worker node names at ``now``
    (only attempts started before ``started_before``, if given), so the next recovery pass
    requeues them; returns how many."""
    if not workers:
        return 0
    where = [
        StepRunRow.status == StepStatus.RUNNING.value,
        StepRunRow.worker_host.in_(list(workers)),
        StepRunRow.lease_expires_at > now,
    ]
    if started_before is not None:
        where.append(StepRunRow.started_at < started_before)
    res = s.execute(update(StepRunRow).where(*where).values(lease_expires_at=now))
    return int(res.rowcount)  # type: ignore[attr-defined]


def expire_orphaned_leases(s: Session, worker: str, *, alive: set[int], seen_at: float) -> int:
    """End the leases of running steps recorded under node ``worker`` whose process is not in
    ``alive`` (listed at ``seen_at``) and that started before ``seen_at``; returns how many."""
    res = s.execute(
        update(StepRunRow)
        .where(
            StepRunRow.status == StepStatus.RUNNING.value,
            StepRunRow.worker_host == worker,
            StepRunRow.worker_pid.not_in(sorted(alive)),
            StepRunRow.started_at < seen_at,
            StepRunRow.lease_expires_at > seen_at,
        )
        .values(lease_expires_at=seen_at)
    )
    return int(res.rowcount)  # type: ignore[attr-defined]
