"""Statements on runs, step runs, artifacts and lineage, each inside a caller's session.

The caller (scheduler, worker, client) owns the transaction, so a step's whole
bookkeeping (status, artifacts, lineage, downstream readiness) commits at once.
Every status change is a guarded ``UPDATE ... WHERE status = <expected>``: when
two processes race, exactly one sees a row count of 1.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func, insert, select, update
from sqlalchemy.orm import Session

from stores.errors import MetadataStoreError, NotFoundError
from stores.metadata import statements as sql
from stores.metadata.models import (
    ArtifactRow,
    CodeBlobRow,
    LineageRow,
    PipelineRow,
    RunRow,
    StepRunRow,
)
from stores.metadata.states import Move, RunStatus, StepStatus, sources, target

INPUT = sql.INPUT
OUTPUT = sql.OUTPUT
STEPS, LINEAGE, ARTIFACTS, RUNS = sql.STEPS, sql.LINEAGE, sql.ARTIFACTS, sql.RUNS


@dataclass(frozen=True)
class ArtifactRef:
    """What deciding a cache hit and loading an input need to know of an artifact."""

    id: str
    content_hash: str
    uri: str = ""
    materializer: str = ""
    data_type: str = ""

    def encode(self) -> dict[str, str]:
        return {
            "id": self.id,
            "content_hash": self.content_hash,
            "uri": self.uri,
            "materializer": self.materializer,
            "data_type": self.data_type,
        }


@dataclass
class CacheHit:
    step_run_id: str
    run_id: str
    ended_at: float
    outputs: dict[str, ArtifactRef]


@dataclass(frozen=True)
class QueuedRow:
    id: str
    run_id: str
    invocation_id: str
    step_name: str
    queue: str
    task_id: str


def new_id() -> str:
    return str(uuid.uuid4())


def task_id(step_run_id: str, attempt: int) -> str:
    """Broker task id of an attempt: a resend of the same attempt reuses it, a retry does not."""
    return f"{step_run_id}.{attempt}"


# -- pipelines, code, runs ------------------------------------------------------------------


def ensure_pipeline(s: Session, name: str, now: float) -> str:
    """Id of the pipeline called ``name``, created if new."""
    pid = s.execute(select(PipelineRow.id).where(PipelineRow.name == name)).scalar()
    if pid is not None:
        return pid
    pid = new_id()
    s.execute(insert(PipelineRow).values(id=pid, name=name, created_at=now))
    return pid


def put_code_blobs(s: Session, blobs: Sequence[dict[str, Any]], now: float) -> None:
    """Store step code blobs that are not stored yet (keyed by their content hash)."""
    if not blobs:
        return
    for b in blobs:
        # Keyed by content: a writer cannot store other bytes under a hash (and so poison it
        # for everyone who later submits the same step).
        actual = "sha256:" + hashlib.sha256(b["pickled"]).hexdigest()
        if actual != b["code_hash"]:
            raise MetadataStoreError(
                f"code blob {b['code_hash']} ({b.get('name', '?')}) hashes to {actual}; refusing to store it"
            )
    hashes = [b["code_hash"] for b in blobs]
    have = set(
        s.execute(select(CodeBlobRow.code_hash).where(CodeBlobRow.code_hash.in_(hashes))).scalars()
    )
    missing = [dict(b, created_at=now) for b in blobs if b["code_hash"] not in have]
    if missing:
        s.execute(insert(CodeBlobRow), missing)


def settle_steps(s: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Write the cache decision of just-unblocked steps (ready or cached) in one executemany."""
    if rows:
        s.connection().execute(sql.SET_STEP, list(rows))


def get_code_blob(s: Session, code_hash: str) -> CodeBlobRow:
    row = s.get(CodeBlobRow, code_hash)
    if row is None:
        raise NotFoundError(f"step code {code_hash} is not in the metadata store")
    return row


def create_run(s: Session, *, run: dict[str, Any], steps: Sequence[dict[str, Any]]) -> None:
    """Insert a run and all its step rows in the caller's transaction."""
    c = s.connection()
    c.execute(RUNS.insert(), [run])
    if steps:
        c.execute(STEPS.insert(), [dict(st, run_id=run["id"]) for st in steps])


def get_run(s: Session, run_id: str) -> RunRow:
    row = s.get(RunRow, run_id)
    if row is None:
        raise NotFoundError(f"no run with id {run_id!r}; list runs with `zw runs`")
    return row


def get_pipeline(s: Session, name: str) -> PipelineRow:
    row = s.execute(select(PipelineRow).where(PipelineRow.name == name)).scalar()
    if row is None:
        raise NotFoundError(f"no pipeline named {name!r} has run on this metadata store")
    return row


def list_pipelines(s: Session) -> list[PipelineRow]:
    return list(s.execute(select(PipelineRow).order_by(PipelineRow.name)).scalars())


def list_runs(
    s: Session, *, pipeline: str | None = None, user: str | None = None, limit: int = 50
) -> list[RunRow]:
    """The newest runs, of one pipeline and/or one user's when given."""
    q = select(RunRow).order_by(RunRow.created_at.desc()).limit(limit)
    if pipeline is not None:
        q = q.where(RunRow.pipeline_name == pipeline)
    if user is not None:
        q = q.where(RunRow.user == user)
    return list(s.execute(q).scalars())


def set_run_status(
    s: Session, run_id: str, status: RunStatus, *, now: float, message: str | None = None
) -> bool:
    """Move a running run to ``status``; False when it had already ended."""
    values: dict[str, Any] = {"status": status.value}
    if status.is_terminal():
        values["ended_at"] = now
    if status is RunStatus.COMPLETED:
        values["message"] = ""  # e.g. an old "steps wait on queue ..." no longer applies
    if message is not None:
        values["message"] = message
    res = s.connection().execute(
        update(RUNS)
        .where(RUNS.c.id == run_id, RUNS.c.status == RunStatus.RUNNING.value)
        .values(**values)
    )
    return res.rowcount == 1


def lock_run(s: Session, run_id: str) -> None:
    """Hold the run's row until the transaction ends (PostgreSQL; SQLite writers are serialised)."""
    s.connection().execute(sql.LOCK_RUN, {"run_id": run_id})


def set_run_message(s: Session, run_id: str, message: str) -> None:
    s.execute(update(RunRow).where(RunRow.id == run_id).values(message=message))


def running_runs(s: Session) -> list[RunRow]:
    return list(s.execute(select(RunRow).where(RunRow.status == RunStatus.RUNNING.value)).scalars())


# -- step runs ------------------------------------------------------------------------------


def step_runs(
    s: Session, run_id: str, invocation_ids: Iterable[str] | None = None
) -> list[StepRunRow]:
    q = select(StepRunRow).where(StepRunRow.run_id == run_id).order_by(StepRunRow.position)
    if invocation_ids is not None:
        q = q.where(StepRunRow.invocation_id.in_(list(invocation_ids)))
    return list(s.execute(q).scalars())


def status_counts(s: Session, run_id: str) -> dict[str, int]:
    rows = s.execute(
        select(StepRunRow.status, func.count())
        .where(StepRunRow.run_id == run_id)
        .group_by(StepRunRow.status)
    )
    return {status: n for status, n in rows}


def decrement_deps(s: Session, run_id: str, invocation_ids: Sequence[str]) -> list[Row[Any]]:
    """Count one finished upstream for each of ``invocation_ids``; return (id, invocation_id) of those
    now unblocked.

    One ``UPDATE ... RETURNING``: row locks serialise concurrent finishers, so
    exactly one of them sees a step reach zero and moves it on.
    """
    if not invocation_ids:
        return []
    rows = s.connection().execute(
        sql.DECREMENT, {"b_run_id": run_id, "b_invs": list(invocation_ids)}
    )
    return [r for r in rows if r.deps_left == 0 and r.status == StepStatus.PENDING.value]


def transition(s: Session, step_run_id: str, move: Move, **values: Any) -> bool:
    """Make ``move`` on one step run, guarded by the statuses it may start from; True when this
    caller made it (a concurrent caller that got there first makes it False)."""
    res = s.execute(
        update(StepRunRow)
        .where(StepRunRow.id == step_run_id, StepRunRow.status.in_(sources(move)))
        .values(status=target(move), **values)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def queue_ready(
    s: Session, run_id: str, window: int, now: float, *, run_steps: int | None = None
) -> list[Row[Any]]:
    """Queue ready steps of a run, lowest position first, until ``window`` of its steps are on the
    broker or running; returns them with their task ids.

    ``run_steps`` (the run's size) lets a run that cannot fill the window skip counting.
    """
    c = s.connection()
    in_flight = 0
    if run_steps is None or run_steps > window:
        in_flight = c.execute(sql.IN_FLIGHT, {"run_id": run_id}).scalar_one()
    free = window - in_flight
    if free <= 0:
        return []
    return list(c.execute(sql.QUEUE_READY, {"q_run_id": run_id, "q_limit": free, "q_now": now}))


def count_unfinished(s: Session, run_id: str) -> int:
    return s.connection().execute(sql.UNFINISHED, {"run_id": run_id}).scalar_one()


def touch_queued(s: Session, step_run_id: str, now: float) -> None:
    """Restart the clock of a queued step that is being sent again."""
    s.execute(
        update(StepRunRow)
        .where(StepRunRow.id == step_run_id, StepRunRow.status.in_(sources(Move.RESEND)))
        .values(status=target(Move.RESEND), queued_at=now)
    )


#: ``queued_at`` of a queued step whose message never reached the broker: the scheduler's
#: next pass resends it (any real queue time is later).
UNSENT = 0.0


def queued_at(s: Session, run_id: str, at: float) -> list[Row[Any]]:
    """Queued steps of a run that were queued at exactly ``at`` (by one transaction)."""
    return list(
        s.execute(
            select(
                STEPS.c.id,
                STEPS.c.run_id,
                STEPS.c.invocation_id,
                STEPS.c.step_name,
                STEPS.c.queue,
                STEPS.c.task_id,
            ).where(
                STEPS.c.run_id == run_id,
                STEPS.c.status == StepStatus.QUEUED.value,
                STEPS.c.queued_at == at,
            )
        )
    )


def mark_unsent(s: Session, step_run_ids: Sequence[str]) -> None:
    """Record that these queued steps' messages could not be sent (the broker was down)."""
    if step_run_ids:
        s.execute(
            update(StepRunRow)
            .where(
                StepRunRow.id.in_(list(step_run_ids)),
                StepRunRow.status.in_(sources(Move.RESEND)),
            )
            .values(queued_at=UNSENT)
        )


def stale_queued(s: Session, queued_before: float) -> list[StepRunRow]:
    return list(
        s.execute(
            select(StepRunRow).where(
                StepRunRow.status == StepStatus.QUEUED.value, StepRunRow.queued_at < queued_before
            )
        ).scalars()
    )


def queued_steps(s: Session, step_run_ids: Sequence[str]) -> list[StepRunRow]:
    """Those of ``step_run_ids`` that are still queued."""
    if not step_run_ids:
        return []
    return list(
        s.execute(
            select(StepRunRow).where(
                StepRunRow.id.in_(list(step_run_ids)),
                StepRunRow.status == StepStatus.QUEUED.value,
            )
        ).scalars()
    )


def waiting_queues(s: Session, run_id: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Queues with queued steps: ``{queue: [(run_id, invocation_id), ...]}``."""
    q = select(StepRunRow.queue, StepRunRow.run_id, StepRunRow.invocation_id).where(
        StepRunRow.status == StepStatus.QUEUED.value
    )
    if run_id is not None:
        q = q.where(StepRunRow.run_id == run_id)
    out: dict[str, list[tuple[str, str]]] = {}
    for queue, rid, inv in s.execute(q):
        out.setdefault(queue, []).append((rid, inv))
    return out


# -- caching --------------------------------------------------------------------------------


def cache_hits(s: Session, keys: Iterable[str], *, now: float | None = None) -> dict[str, CacheHit]:
    """The newest completed (never cached) step run for each cache key, with its outputs.

    A step run whose ``cache_expires_at`` is not after ``now`` (epoch seconds, default the
    clock) or with an output marked corrupt or missing is never offered (one query).
    """
    keys = list(keys)
    if not keys:
        return {}
    hits: dict[str, CacheHit] = {}
    at = time.time() if now is None else now
    for r in s.connection().execute(sql.CACHE_HITS, {"keys": keys, "now": at}):
        hit = hits.get(r.cache_key)
        if hit is None or (hit.step_run_id != r.id and (r.ended_at or 0) > hit.ended_at):
            hit = hits[r.cache_key] = CacheHit(r.id, r.run_id, r.ended_at or 0.0, {})
        if hit.step_run_id == r.id and r.name is not None:
            hit.outputs[r.name] = ArtifactRef(
                r.artifact_id, r.content_hash, r.uri, r.materializer, r.data_type
            )
    return hits


def previous_step_runs(
    s: Session, *, pipeline_name: str, invocation_id: str, before: float, limit: int = 20
) -> list[StepRunRow]:
    """Earlier attempts of the same invocation in the same pipeline, newest first."""
    return list(
        s.execute(
            select(StepRunRow)
            .join(RunRow, RunRow.id == StepRunRow.run_id)
            .where(
                RunRow.pipeline_name == pipeline_name,
                StepRunRow.invocation_id == invocation_id,
                RunRow.created_at < before,
                StepRunRow.cache_ingredients.is_not(None),
            )
            .order_by(RunRow.created_at.desc())
            .limit(limit)
        ).scalars()
    )


# -- artifacts and lineage ------------------------------------------------------------------


def add_artifacts(s: Session, artifacts: Sequence[dict[str, Any]]) -> None:
    if artifacts:
        s.connection().execute(ARTIFACTS.insert(), list(artifacts))


def add_lineage(s: Session, edges: Sequence[dict[str, Any]]) -> None:
    if edges:
        s.connection().execute(LINEAGE.insert(), list(edges))


def output_artifacts(
    s: Session, run_id: str, invocation_ids: Iterable[str]
) -> dict[tuple[str, str], ArtifactRef]:
    """Outputs of the given invocations of a run: ``{(invocation_id, output_name): artifact}``."""
    ids = list(invocation_ids)
    if not ids:
        return {}
    rows = s.connection().execute(sql.OUTPUTS, {"run_id": run_id, "invs": ids})
    return {
        (r._inv, r._out): ArtifactRef(r.id, r.content_hash, r.uri, r.materializer, r.data_type)
        for r in rows
    }


def step_artifacts(
    s: Session, step_run_id: str, direction: str
) -> list[tuple[str, int, ArtifactRow]]:
    rows = s.execute(
        select(LineageRow.name, LineageRow.position, ArtifactRow)
        .join(ArtifactRow, ArtifactRow.id == LineageRow.artifact_id)
        .where(LineageRow.step_run_id == step_run_id, LineageRow.direction == direction)
        .order_by(LineageRow.name, LineageRow.position)
    )
    return [(name, pos, art) for name, pos, art in rows]


def get_artifact(s: Session, artifact_id: str) -> ArtifactRow:
    row = s.get(ArtifactRow, artifact_id)
    if row is None:
        raise NotFoundError(f"no artifact with id {artifact_id!r}")
    return row


# -- artifact integrity (load-time verification) ---------------------------------------------


def mark_artifact_corrupt(s: Session, artifact_id: str, *, now: float) -> tuple[str, str] | None:
    """Record that a load found the bytes of ``artifact_id`` no longer match its hash, so
    that no step run with it as an output is offered as a cache hit again
    (``statements.CACHE_HITS``). The first time found is kept.

    Returns:
        ``(producer run id, producer invocation id)`` for the error message, or None when
        no such artifact is recorded.
    """
    row = s.get(ArtifactRow, artifact_id)
    if row is None:
        return None
    if row.corrupted_at is None:
        row.corrupted_at = now
    producer = s.get(StepRunRow, row.producer_step_run_id)
    invocation = producer.invocation_id if producer is not None else row.producer_step_run_id
    return row.producer_run_id, invocation
