"""Statements on workers and the leases of their steps, each inside a caller's session.

A worker's row (its node name, queues, pid and last heartbeat) tells the scheduler which
queues some live worker consumes and which workers went silent. The leases of a silent or
restarted worker, or of its dead pool processes, are only ended here (set to ``now``):
the next recovery pass requeues or fails those steps with the guarded transitions of
:mod:`stores.metadata.queries`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from stores.metadata.models import StepRunRow, WorkerRow
from stores.metadata.states import Move, StepStatus, sources, target

# -- heartbeats -----------------------------------------------------------------------------


def worker_heartbeat(
    s: Session,
    *,
    name: str,
    queues: list[str],
    host: str,
    pid: int,
    now: float,
    concurrency: int = 0,
) -> None:
    """Record that worker ``name`` is alive at ``now``, consuming ``queues`` with ``concurrency``
    pool slots (0: unknown)."""
    row = s.get(WorkerRow, name)
    if row is None:
        s.add(
            WorkerRow(
                name=name,
                queues=queues,
                host=host,
                pid=pid,
                started_at=now,
                heartbeat_at=now,
                concurrency=concurrency,
            )
        )
    else:
        row.queues, row.host, row.pid, row.heartbeat_at, row.stopped = queues, host, pid, now, False
        row.concurrency = concurrency


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


@dataclass(frozen=True)
class LiveWorker:
    """A worker whose heartbeat is recent: its node name, queues and pool slots (0: unknown)."""

    name: str
    queues: tuple[str, ...]
    concurrency: int


def live_workers(s: Session, *, now: float, max_age_s: float) -> list[LiveWorker]:
    """Workers not stopped whose heartbeat is younger than ``max_age_s``, by name."""
    rows = s.execute(
        select(WorkerRow.name, WorkerRow.queues, WorkerRow.concurrency)
        .where(WorkerRow.stopped.is_(False), WorkerRow.heartbeat_at >= now - max_age_s)
        .order_by(WorkerRow.name)
    )
    return [LiveWorker(name, tuple(queues or ()), int(c or 0)) for name, queues, c in rows]


def takeovers(s: Session) -> dict[str, int]:
    """How many steps each known worker took over from a dead process, by node name."""
    rows = s.execute(select(WorkerRow.name, WorkerRow.takeovers).where(WorkerRow.takeovers > 0))
    return {name: int(n) for name, n in rows}


def count_takeover(s: Session, name: str) -> None:
    """Add one to worker ``name``'s takeover counter (a step it took over from a dead process)."""
    s.execute(
        update(WorkerRow).where(WorkerRow.name == name).values(takeovers=WorkerRow.takeovers + 1)
    )


def queue_demand(s: Session) -> dict[str, dict[str, int]]:
    """Steps whose inputs exist but that have not finished, per queue and status: ``ready``
    (waiting in SQL for a slot in their run's broker window), ``queued`` (sent to the
    broker) and ``running``. One grouped query."""
    wanted = [StepStatus.READY.value, StepStatus.QUEUED.value, StepStatus.RUNNING.value]
    rows = s.execute(
        select(StepRunRow.queue, StepRunRow.status, func.count())
        .where(StepRunRow.status.in_(wanted))
        .group_by(StepRunRow.queue, StepRunRow.status)
    )
    out: dict[str, dict[str, int]] = {}
    for queue, status, n in rows:
        out.setdefault(queue, dict.fromkeys(wanted, 0))[status] = int(n)
    return out


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


# -- attempts that a supervisor watches, stops or hands back ---------------------------------


@dataclass(frozen=True)
class AttemptState:
    """Where a step run stands, as a process supervising its attempt needs it."""

    id: str
    status: str
    attempt: int
    worker_host: str | None
    worker_pid: int | None
    task_id: str | None


_ATTEMPT_COLUMNS = (
    StepRunRow.id,
    StepRunRow.status,
    StepRunRow.attempt,
    StepRunRow.worker_host,
    StepRunRow.worker_pid,
    StepRunRow.task_id,
)


def attempt_states(s: Session, step_run_ids: Sequence[str]) -> dict[str, AttemptState]:
    """The state of each of these step runs, by id (one query)."""
    if not step_run_ids:
        return {}
    rows = s.execute(select(*_ATTEMPT_COLUMNS).where(StepRunRow.id.in_(list(step_run_ids))))
    return {r.id: AttemptState(*r) for r in rows}


def running_on(s: Session, worker: str, pids: Sequence[int]) -> list[AttemptState]:
    """Running steps recorded under node ``worker`` whose attempt one of ``pids`` holds."""
    if not pids:
        return []
    rows = s.execute(
        select(*_ATTEMPT_COLUMNS).where(
            StepRunRow.status == StepStatus.RUNNING.value,
            StepRunRow.worker_host == worker,
            StepRunRow.worker_pid.in_(sorted(pids)),
        )
    )
    return [AttemptState(*r) for r in rows]


def hand_back(
    s: Session, step_run_id: str, attempt: int, *, host: str, pid: int, now: float, reason: str
) -> bool:
    """Put attempt ``attempt`` of a running step, held by ``pid`` on node ``host``, back on the
    queue because its worker is shutting down; False when that attempt no longer holds it.

    The step keeps its task id (its message goes back to the broker as it is) and gets one
    more allowed attempt, so the next claim starts a new attempt (its outputs get new keys)
    without using up the step's retries or its tolerance of lost workers.
    """
    res = s.execute(
        update(StepRunRow)
        .where(
            StepRunRow.id == step_run_id,
            StepRunRow.status.in_(sources(Move.HAND_BACK)),
            StepRunRow.attempt == attempt,
            StepRunRow.worker_host == host,
            StepRunRow.worker_pid == pid,
        )
        .values(
            status=target(Move.HAND_BACK),
            max_attempts=StepRunRow.max_attempts + 1,
            queued_at=now,
            lease_expires_at=None,
            exception=reason,
        )
    )
    return int(res.rowcount) == 1  # type: ignore[attr-defined]
