"""Moving a run forward inside one SQL transaction.

Every function here takes the caller's session and returns the step tasks to
put on the broker *after* the caller commits. A finishing step resolves its
downstream steps in the same transaction as its own result: cache hits are
linked at once (and cascade), the rest become ``ready`` and enter the run's
broker window, so nothing polls for work on the critical path. What a step's cache
decision is lives in :mod:`scheduler.decisions`; how an attempt ends, in
:mod:`scheduler.outcomes`.

The window (``max_queued_per_run``) keeps at most that many of a run's steps on
the broker at a time; the rest wait as ``ready`` rows and are topped up as the
run's steps finish, so a 10k-step fan-out cannot starve a small run queued
after it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler import decisions
from scheduler.specs import PipelineSpec, StepSpec, StepTask
from stores.metadata import cache as cache_rows
from stores.metadata import queries as q
from stores.metadata.models import RunRow
from stores.metadata.states import RunStatus, StepStatus
from stores.metadata.store import STORE_INFO_KEY

DEFAULT_WINDOW = 64


@dataclass(frozen=True)
class QueuedStep:
    """A step attempt to send to the broker once the transaction that queued it commits."""

    task: StepTask
    queue: str
    task_id: str
    step_name: str
    #: The step's ``timeout_s``: the broker's workers stop it after that long.
    timeout_s: float | None = None
    #: Start it no sooner than this many seconds from now (a retry backing off).
    delay_s: float = 0.0


class SpecCache:
    """Decoded pipeline specs by run id (immutable once a run exists), with derived maps."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._specs: dict[
            str, tuple[PipelineSpec, dict[str, StepSpec], dict[str, tuple[str, ...]]]
        ] = {}

        #: Whether a run's steps take part in single-flight (see :meth:`flies`).
        self._flies: dict[str, bool] = {}

    def put(self, run_id: str, spec: PipelineSpec, *, flies: bool | None = None) -> None:
        if len(self._specs) >= self._size:
            gone = next(iter(self._specs))
            self._specs.pop(gone)
            self._flies.pop(gone, None)
        self._specs[run_id] = (spec, spec.by_id(), spec.downstream())
        if flies is not None:
            self._flies[run_id] = flies

    def flies(self, s: Session, run_id: str) -> bool:
        """Whether the run's steps share in-flight cache keys (:mod:`scheduler.flight`): runs
        whose steps go through a broker. The embedded orchestrator's runs do not: their
        follow-up tasks live in one process's pool, which another run could not rely on."""
        flies = self._flies.get(run_id)
        if flies is None:
            orchestrator = s.execute(
                select(RunRow.orchestrator).where(RunRow.id == run_id)
            ).scalar_one()
            flies = self._flies[run_id] = orchestrator_flies(orchestrator)
        return flies

    def cached(
        self, run_id: str
    ) -> tuple[PipelineSpec, dict[str, StepSpec], dict[str, tuple[str, ...]]] | None:
        """The run's spec if this process has it, without touching the database."""
        return self._specs.get(run_id)

    def get(
        self, s: Session, run_id: str
    ) -> tuple[PipelineSpec, dict[str, StepSpec], dict[str, tuple[str, ...]]]:
        hit = self._specs.get(run_id)
        if hit is None:
            text, orchestrator = s.execute(
                select(RunRow.spec, RunRow.orchestrator).where(RunRow.id == run_id)
            ).one()
            self.put(run_id, PipelineSpec.decode(text), flies=orchestrator_flies(orchestrator))
            hit = self._specs[run_id]
        return hit


def orchestrator_flies(orchestrator: str) -> bool:
    """Whether runs of ``orchestrator`` (``runs.orchestrator``) take part in single-flight."""
    return orchestrator != "local"


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
    origin: dict[str, Any] | None = None,
    reuse: Mapping[str, str] | None = None,
    verify: decisions.Verify | None = None,
) -> list[QueuedStep]:
    """Record a new run and its steps and return the first tasks to send.

    ``verify`` checks that a cache hit's objects still exist (see :data:`decisions.Verify`; None:
    trust the metadata store). A step whose key is being computed by another run waits for
    it (``waiting``, :mod:`scheduler.flight`) when the run goes through a broker.

    ``origin`` records what the run came from (a retry, rerun or copy of another run).
    ``reuse`` maps invocation ids to step runs of an earlier run (a retry): such a step is
    cached from that step run when its cache key is the same, even with caching off.

    Cache hits are resolved in memory before anything is written (one lookup
    per DAG level), so each step row is inserted once, already in its state:
    a fully cached run costs a handful of statements however deep it is.
    """
    now = time.time() if now is None else now
    pipeline_id = q.ensure_pipeline(s, spec.name, now)
    q.put_code_blobs(s, code_blobs, now)
    by_id, downstream = spec.by_id(), spec.downstream()
    rows: dict[str, dict[str, Any]] = {
        st.invocation_id: {
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
            "cache_key": None,
            "cache_ingredients": None,
            "cached_from_run_id": None,
            "cached_from_step_run_id": None,
            "waits_for": None,
            "started_at": None,
            "ended_at": None,
            "task_id": None,
            "queued_at": None,
        }
        for i, st in enumerate(spec.steps)
    }
    produced: dict[tuple[str, str], q.ArtifactRef] = {}
    edges: list[dict[str, Any]] = []
    wave = [st.invocation_id for st in spec.steps if not st.upstream]
    flies = orchestrator_flies(orchestrator)
    while wave:
        next_wave = []
        # Hits are verified all at once below (one batch of lookups, not one per DAG level).
        decided = decisions.decide(s, wave, by_id, produced, reuse, now=now)
        if flies:
            ids = {inv: rows[inv]["id"] for inv in wave}
            decided = decisions.fly(s, decided, ids, run_id, by_id, produced, verify=None, now=now)
        for d in decided:
            row = rows[d.invocation_id]
            row.update(decisions.cache_columns(d, now))
            if d.hit is None:
                continue
            edges += decisions.link_hit(by_id[d.invocation_id], row["id"], run_id, d.hit, produced)
            for down in downstream[d.invocation_id]:
                rows[down]["deps_left"] -= 1
                if rows[down]["deps_left"] == 0:
                    next_wave.append(down)
        wave = next_wave
    read = decisions.read_hit_outputs(spec, rows, produced) if verify is not None else []
    missing = verify(read) if verify is not None and read else set()
    if missing:
        # Rare: some hit's object is gone. Marked, it is no hit any more; plan again (this
        # transaction's flight rows are replaced by the new plan's, as owned by no step).
        cache_rows.mark_checked(s, missing=sorted(missing), now=now)
        return plan_run(
            s,
            spec=spec,
            code_blobs=(),
            run_id=run_id,
            run_name=run_name,
            config=config,
            environment=environment,
            user=user,
            orchestrator=orchestrator,
            window=window,
            now=now,
            origin=origin,
            reuse=reuse,
            verify=verify,
        )
    SPECS.put(run_id, spec, flies=flies)
    queued: list[QueuedStep] = []
    for row in rows.values():
        if row["status"] == StepStatus.READY.value and len(queued) < window:
            row.update(
                status=StepStatus.QUEUED.value, task_id=q.task_id(row["id"], 1), queued_at=now
            )
            queued.append(
                queued_step(
                    s,
                    q.QueuedRow(
                        row["id"],
                        run_id,
                        row["invocation_id"],
                        row["step_name"],
                        row["queue"],
                        row["task_id"],
                    ),
                )
            )
    finished = all(StepStatus(r["status"]).is_terminal() for r in rows.values())
    q.create_run(
        s,
        run={
            "id": run_id,
            "pipeline_id": pipeline_id,
            "pipeline_name": spec.name,
            "name": run_name,
            "status": (RunStatus.COMPLETED if finished else RunStatus.RUNNING).value,
            "spec": spec.encode(),
            "config": config,
            "environment": environment,
            "user": user,
            "orchestrator": orchestrator,
            "steps_total": len(rows),
            "created_at": now,
            "ended_at": now if finished else None,
            "message": "",
            "origin": origin,
        },
        steps=list(rows.values()),
    )
    q.add_lineage(s, edges)
    return queued


def resolve(
    s: Session,
    run_id: str,
    unblocked: Sequence[Any],
    *,
    window: int,
    now: float,
    known: dict[tuple[str, str], Any] | None = None,
    leaf: bool = True,
    verify: decisions.Verify | None = None,
) -> list[QueuedStep]:
    """Settle steps just unblocked by a finished step: link cache hits (cascading), mark the rest
    ready (or waiting for the step run computing the same key), then fill the run's broker window.

    ``unblocked`` rows carry ``id`` and ``invocation_id``; ``known`` holds artifacts
    this transaction already knows (the finished step's outputs), so they are not read back.
    ``leaf`` says the finished step has no downstream steps: only then, or after cache
    hits, can this transaction be the one that ends the run.
    """
    spec, by_id, downstream = SPECS.get(s, run_id)
    produced: dict[tuple[str, str], Any] = dict(known or {})
    wave = list(unblocked)
    cascaded = False
    while wave:
        missing = {
            r.step
            for w in wave
            for i in by_id[w.invocation_id].inputs
            for r in i.refs
            if (r.step, r.output) not in produced
        }
        if missing:
            produced.update(q.output_artifacts(s, run_id, missing))
        ids = {w.invocation_id: w.id for w in wave}
        settled: list[dict[str, Any]] = []
        edges: list[dict[str, Any]] = []
        cached: list[str] = []
        decided = decisions.decide(s, list(ids), by_id, produced, verify=verify, now=now)
        if SPECS.flies(s, run_id):
            decided = decisions.fly(
                s, decided, ids, run_id, by_id, produced, verify=verify, now=now
            )
        for d in decided:
            settled.append({"_id": ids[d.invocation_id], **decisions.cache_columns(d, now)})
            if d.hit is not None:
                cached.append(d.invocation_id)
                edges += decisions.link_hit(
                    by_id[d.invocation_id], ids[d.invocation_id], run_id, d.hit, produced
                )
        q.settle_steps(s, settled)
        q.add_lineage(s, edges)
        cascaded = cascaded or bool(cached)
        wave = [r for inv in cached for r in q.decrement_deps(s, run_id, downstream[inv])]
    queued = fill_window(s, run_id, window=window, now=now, produced=produced)
    if not queued and (leaf or cascaded):
        finish_run_if_done(s, run_id, now=now)
    return queued


def fill_window(
    s: Session,
    run_id: str,
    *,
    window: int,
    now: float,
    produced: dict[tuple[str, str], Any] | None = None,
) -> list[QueuedStep]:
    """Queue ready steps of a run until ``window`` of them are on the broker or running.

    With ``produced``, a task whose input artifacts are all known here carries them,
    so its worker need not read them back.
    """
    spec, by_id, _ = SPECS.get(s, run_id)
    out = []
    for row in q.queue_ready(s, run_id, window, now, run_steps=len(spec.steps)):
        inputs = None
        if produced is not None:
            refs = [(r.step, r.output) for i in by_id[row.invocation_id].inputs for r in i.refs]
            if all(ref in produced and produced[ref].uri for ref in refs):
                inputs = [{"step": a, "output": b, **produced[(a, b)].encode()} for a, b in refs]
        out.append(queued_step(s, row, inputs))
    return out


def queued_step(s: Session, row: Any, inputs: list[dict[str, str]] | None = None) -> QueuedStep:
    """The broker task for a queued step-run row (``id``, ``run_id``, ``invocation_id``,
    ``step_name``, ``queue``, ``task_id``)."""
    spec, by_id, _ = SPECS.get(s, row.run_id)
    store_id, store_url = store_identity(s)
    task = StepTask(
        run_id=row.run_id,
        step_run_id=row.id,
        invocation_id=row.invocation_id,
        pipeline=spec.name,
        inputs=inputs,
        store_id=store_id,
        store_url=store_url,
    )
    return QueuedStep(
        task=task,
        queue=row.queue,
        task_id=row.task_id,
        step_name=row.step_name,
        timeout_s=by_id[row.invocation_id].timeout_s,
    )


def store_identity(s: Session) -> tuple[str, str]:
    """The id and redacted URL of the metadata store ``s`` belongs to, which every step task
    carries (``("", "")`` for a session made outside a :class:`MetadataStore`)."""
    store = s.info.get(STORE_INFO_KEY)
    if store is None:
        return "", ""
    return store.store_id(s), store.redacted_url


def finish_run_if_done(s: Session, run_id: str, *, now: float) -> bool:
    """Mark a running run completed when none of its steps is left unfinished.

    The run row is locked first: two steps committing at once under READ COMMITTED
    would each still see the other as running, and neither would close the run.
    """
    q.lock_run(s, run_id)
    if q.count_unfinished(s, run_id) == 0:
        return q.set_run_status(s, run_id, RunStatus.COMPLETED, now=now)
    return False


#: Key of a step's ``values`` holding its attempt's last log lines (a
#: :class:`stores.metadata.logs.LogWrite`), stored by the transaction that ends the attempt.
