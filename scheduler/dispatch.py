"""Moving a run forward inside one SQL transaction.

Every function here takes the caller's session and returns the step tasks to
put on the broker *after* the caller commits. A finishing step resolves its
downstream steps in the same transaction as its own result: cache hits are
linked at once (and cascade), the rest become ``ready`` and enter the run's
broker window, so nothing polls for work on the critical path.

The window (``max_queued_per_run``) keeps at most that many of a run's steps on
the broker at a time; the rest wait as ``ready`` rows and are topped up as the
run's steps finish, so a 10k-step fan-out cannot starve a small run queued
after it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scheduler import cache
from stores.metadata import queries as q
from stores.metadata.models import RunRow, StepRunRow
from stores.metadata.states import RunStatus, StepStatus
from zenml_workers.specs import PipelineSpec, StepSpec, StepTask

DEFAULT_WINDOW = 64


@dataclass(frozen=True)
class QueuedStep:
    """A step attempt to send to the broker once the transaction that queued it commits."""

    task: StepTask
    queue: str
    task_id: str
    step_name: str


class SpecCache:
    """Decoded pipeline specs by run id (immutable once a run exists), with derived maps."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._specs: dict[str, tuple[PipelineSpec, dict[str, StepSpec], dict[str, tuple[str, ...]]]] = {}

    def put(self, run_id: str, spec: PipelineSpec) -> None:
        if len(self._specs) >= self._size:
            self._specs.pop(next(iter(self._specs)))
        self._specs[run_id] = (spec, spec.by_id(), spec.downstream())

    def get(self, s: Session, run_id: str) -> tuple[PipelineSpec, dict[str, StepSpec], dict[str, tuple[str, ...]]]:
        hit = self._specs.get(run_id)
        if hit is None:
            text = s.execute(select(RunRow.spec).where(RunRow.id == run_id)).scalar_one()
            self.put(run_id, PipelineSpec.decode(text))
            hit = self._specs[run_id]
        return hit


SPECS = SpecCache()


def plan_run(
    s: Session,
    *,
    spec: PipelineSpec,
    code_blobs: Sequence[dict[str, Any]],
    run_id: str,
    run_name: str,
    config: dict[str, Any],
    environment: dict[str, Any],
    user: str,
    orchestrator: str,
    window: int = DEFAULT_WINDOW,
    now: float | None = None,
) -> list[QueuedStep]:
    """Record a new run and its steps, resolve cached roots, and return the first tasks to send."""
    now = time.time() if now is None else now
    pipeline_id = q.ensure_pipeline(s, spec.name, now)
    q.put_code_blobs(s, code_blobs, now)
    steps = [
        {
            "id": q.new_id(),
            "invocation_id": st.invocation_id,
            "step_name": st.name,
            "position": i,
            "status": StepStatus.PENDING.value,
            "queue": st.queue,
            "attempt": 0,
            "max_attempts": st.retries + 1,
            "deps_left": len(st.upstream),
            "code_hash": st.code_hash,
            "source_hash": st.source_hash,
            "logs": "",
            "exception": "",
            "traceback": "",
            "step_metadata": {},
        }
        for i, st in enumerate(spec.steps)
    ]
    q.create_run(
        s,
        run={
            "id": run_id,
            "pipeline_id": pipeline_id,
            "pipeline_name": spec.name,
            "name": run_name,
            "status": RunStatus.RUNNING.value,
            "spec": spec.encode(),
            "config": config,
            "environment": environment,
            "user": user,
            "orchestrator": orchestrator,
            "steps_total": len(steps),
            "created_at": now,
            "message": "",
        },
        steps=steps,
    )
    SPECS.put(run_id, spec)
    roots = [st.invocation_id for st in spec.steps if not st.upstream]
    return _resolve(s, run_id, roots, window=window, now=now)


def _resolve(s: Session, run_id: str, unblocked: list[str], *, window: int, now: float) -> list[QueuedStep]:
    """Settle unblocked steps: link cache hits (cascading), mark the rest ready, fill the window."""
    spec, by_id, downstream = SPECS.get(s, run_id)
    wave = unblocked
    while wave:
        rows = {r.invocation_id: r for r in q.step_runs(s, run_id, wave)}
        upstream_ids = {ref.step for inv in wave for i in by_id[inv].inputs for ref in i.refs}
        produced = q.output_artifacts(s, run_id, upstream_ids)
        keyed: dict[str, tuple[str, dict[str, Any]]] = {}
        for inv in wave:
            step = by_id[inv]
            hashes = {i.name: [produced[(r.step, r.output)].content_hash for r in i.refs] for i in step.inputs}
            ingr = cache.ingredients(step, hashes)
            keyed[inv] = (cache.cache_key(ingr), ingr)
        hits = _cache_hits(s, {k for inv, (k, _) in keyed.items() if by_id[inv].enable_cache})
        cached: list[dict[str, Any]] = []
        ready: list[dict[str, Any]] = []
        cached_ids: list[str] = []
        for inv in wave:
            key, ingr = keyed[inv]
            row, hit = rows[inv], hits.get(key) if by_id[inv].enable_cache else None
            if hit is not None and _link_cached(s, by_id[inv], row, hit, produced, now):
                cached.append({"id": row.id, "status": StepStatus.CACHED.value, "cache_key": key,
                               "cache_ingredients": ingr, "cached_from_run_id": hit.run_id,
                               "cached_from_step_run_id": hit.id, "started_at": now, "ended_at": now})
                cached_ids.append(inv)
            else:
                ready.append({"id": row.id, "status": StepStatus.READY.value, "cache_key": key,
                              "cache_ingredients": ingr})
        for batch in (cached, ready):
            if batch:
                s.execute(update(StepRunRow), batch)
        wave = []
        for inv in cached_ids:
            wave.extend(q.decrement_deps(s, run_id, downstream[inv]))
    queued = fill_window(s, run_id, spec.name, by_id, window=window, now=now)
    if not queued:
        finish_run_if_done(s, run_id, now=now)
    return queued


def _cache_hits(s: Session, keys: set[str]) -> dict[str, StepRunRow]:
    hits: dict[str, StepRunRow] = {}
    for key in keys:
        hit = q.find_cache_hit(s, key)
        if hit is not None:
            hits[key] = hit
    return hits


def _link_cached(
    s: Session,
    step: StepSpec,
    row: StepRunRow,
    hit: StepRunRow,
    produced: dict[tuple[str, str], Any],
    now: float,
) -> bool:
    """Link a cache hit's output artifacts (no copies) and this step's inputs; False if outputs are missing."""
    outputs = {name: art for name, _, art in q.step_artifacts(s, hit.id, q.OUTPUT)}
    if set(outputs) != set(step.output_names()):
        return False
    edges = [
        {"step_run_id": row.id, "direction": q.OUTPUT, "name": name, "position": 0,
         "artifact_id": art.id, "run_id": row.run_id}
        for name, art in outputs.items()
    ]
    edges += input_edges(step, row, produced)
    q.add_lineage(s, edges)
    return True


def input_edges(step: StepSpec, row: StepRunRow, produced: dict[tuple[str, str], Any]) -> list[dict[str, Any]]:
    """Lineage rows recording which artifacts a step run consumed."""
    return [
        {"step_run_id": row.id, "direction": q.INPUT, "name": i.name, "position": pos,
         "artifact_id": produced[(ref.step, ref.output)].id, "run_id": row.run_id}
        for i in step.inputs
        for pos, ref in enumerate(i.refs)
    ]


def fill_window(
    s: Session, run_id: str, pipeline: str, by_id: dict[str, StepSpec], *, window: int, now: float
) -> list[QueuedStep]:
    """Queue ready steps of a run until ``window`` of them are on the broker or running."""
    free = window - q.count_in_flight(s, run_id)
    return [
        _queued_step(row, pipeline)
        for row in q.queue_ready(s, run_id, free, now)
    ]


def _queued_step(row: StepRunRow, pipeline: str) -> QueuedStep:
    assert row.task_id is not None
    task = StepTask(run_id=row.run_id, step_run_id=row.id, invocation_id=row.invocation_id, pipeline=pipeline)
    return QueuedStep(task=task, queue=row.queue, task_id=row.task_id, step_name=row.step_name)


def finish_run_if_done(s: Session, run_id: str, *, now: float) -> bool:
    """Mark a running run completed when none of its steps is left unfinished."""
    if q.count_unfinished(s, run_id) == 0:
        return q.set_run_status(s, run_id, RunStatus.COMPLETED, now=now)
    return False


def step_succeeded(
    s: Session,
    row: StepRunRow,
    *,
    attempt: int,
    artifacts: Sequence[dict[str, Any]],
    edges: Sequence[dict[str, Any]],
    values: dict[str, Any],
    window: int = DEFAULT_WINDOW,
    now: float,
) -> list[QueuedStep] | None:
    """Commit a successful attempt and move the run on; None when the attempt had lost its lease."""
    if not q.finish_attempt(s, row.id, attempt, StepStatus.COMPLETED, ended_at=now, **values):
        return None
    q.add_artifacts(s, artifacts)
    q.add_lineage(s, edges)
    status = s.execute(select(RunRow.status).where(RunRow.id == row.run_id)).scalar_one()
    if status != RunStatus.RUNNING.value:
        return []
    _, _, downstream = SPECS.get(s, row.run_id)
    unblocked = q.decrement_deps(s, row.run_id, downstream[row.invocation_id])
    return _resolve(s, row.run_id, unblocked, window=window, now=now)


def step_failed(
    s: Session,
    row: StepRunRow,
    *,
    attempt: int,
    error: str,
    traceback: str,
    values: dict[str, Any],
    now: float,
    retry_allowed: bool = True,
) -> list[QueuedStep] | None:
    """Record a failed attempt: requeue it while attempts remain, else fail the run.

    Returns the retry task to send, ``[]`` when the run failed, None when the
    attempt had lost its lease.
    """
    if retry_allowed and attempt < row.max_attempts:
        task_id = q.new_id()
        if not q.finish_attempt(
            s, row.id, attempt, StepStatus.QUEUED, queued_at=now, task_id=task_id,
            exception=error, traceback=traceback, **values,
        ):
            return None
        row.task_id, row.status = task_id, StepStatus.QUEUED.value
        return [_queued_step(row, s.execute(select(RunRow.pipeline_name).where(RunRow.id == row.run_id)).scalar_one())]
    if not q.finish_attempt(
        s, row.id, attempt, StepStatus.FAILED, ended_at=now, exception=error, traceback=traceback, **values
    ):
        return None
    fail_run(s, row.run_id, f"step {row.invocation_id!r} failed: {error}", now=now)
    return []


def fail_run(s: Session, run_id: str, message: str, *, now: float) -> None:
    """Fail a run and skip its steps that have not started (running ones finish but move nothing on)."""
    if q.set_run_status(s, run_id, RunStatus.FAILED, now=now, message=message):
        q.stop_unstarted(s, run_id, StepStatus.SKIPPED, now)


def cancel_run(s: Session, run_id: str, *, now: float) -> list[StepRunRow]:
    """Cancel a running run; return the step runs that were queued or running (to revoke)."""
    if not q.set_run_status(s, run_id, RunStatus.CANCELLED, now=now, message="cancelled by user"):
        return []
    stopped = [r for r in q.stop_unstarted(s, run_id, StepStatus.CANCELLED, now) if r.status == StepStatus.QUEUED.value]
    running = [r for r in q.step_runs(s, run_id) if r.status == StepStatus.RUNNING.value]
    for r in running:
        q.transition(s, r.id, StepStatus.RUNNING, StepStatus.CANCELLED, ended_at=now, lease_expires_at=None)
    return stopped + running
