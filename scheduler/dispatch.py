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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler import cache, flight
from scheduler.specs import PipelineSpec, StepSpec, StepTask
from stores.metadata import cache as cache_rows
from stores.metadata import flights, history
from stores.metadata import logs as step_logs
from stores.metadata import queries as q
from stores.metadata.models import RunRow
from stores.metadata.states import UNSTARTED, Move, RunStatus, StepStatus
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
    verify: Verify | None = None,
) -> list[QueuedStep]:
    """Record a new run and its steps and return the first tasks to send.

    ``verify`` checks that a cache hit's objects still exist (see :data:`Verify`; None:
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
        decided = _decide(s, wave, by_id, produced, reuse, now=now)
        if flies:
            ids = {inv: rows[inv]["id"] for inv in wave}
            decided = _fly(s, decided, ids, run_id, by_id, produced, verify=None, now=now)
        for d in decided:
            row = rows[d.invocation_id]
            row.update(_cache_columns(d, now))
            if d.hit is None:
                continue
            edges += _link_hit(by_id[d.invocation_id], row["id"], run_id, d.hit, produced)
            for down in downstream[d.invocation_id]:
                rows[down]["deps_left"] -= 1
                if rows[down]["deps_left"] == 0:
                    next_wave.append(down)
        wave = next_wave
    read = _read_hit_outputs(spec, rows, produced) if verify is not None else []
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


def _read_hit_outputs(
    spec: PipelineSpec, rows: dict[str, dict[str, Any]], produced: dict[tuple[str, str], Any]
) -> list[q.ArtifactRef]:
    """The cache hits' outputs that someone will read: inputs of the steps that compute, and
    the outputs of cached steps nothing downstream consumes (what the user loads). Outputs
    only other cached steps consumed are never read by this run, so they are not looked up:
    a fully cached chain costs one lookup, not one per step."""
    cached = StepStatus.CACHED.value
    consumed: set[str] = set()
    out: dict[str, q.ArtifactRef] = {}
    for st in spec.steps:
        for i in st.inputs:
            for ref in i.refs:
                consumed.add(ref.step)
                if (
                    rows[st.invocation_id]["status"] != cached
                    and rows[ref.step]["status"] == cached
                ):
                    art = produced[(ref.step, ref.output)]
                    out[art.id] = art
    for (inv, _), art in produced.items():
        if inv not in consumed and rows[inv]["status"] == cached:
            out[art.id] = art
    return list(out.values())


def _key(step: StepSpec, produced: dict[tuple[str, str], Any]) -> tuple[str, dict[str, Any]]:
    hashes = {
        i.name: [produced[(r.step, r.output)].content_hash for r in i.refs] for i in step.inputs
    }
    ingr = cache.ingredients(step, hashes)
    return cache.cache_key(ingr), ingr


@dataclass(frozen=True)
class _CacheDecision:
    """A just-unblocked step's cache key, its ingredients and the usable hit, if any."""

    invocation_id: str
    cache_key: str
    ingredients: dict[str, Any]
    hit: q.CacheHit | None
    #: The step run computing the same key that this step waits for (single-flight).
    waits_for: str | None = None


#: ``verify(artifacts)`` returns the ids of those whose object is gone from the artifact store
#: (a cache hit on them is not offered); built from the caller's artifact store.
Verify = Callable[[Sequence[q.ArtifactRef]], set[str]]


def _decide(
    s: Session,
    wave: Sequence[str],
    by_id: dict[str, StepSpec],
    produced: dict[tuple[str, str], Any],
    reuse: Mapping[str, str] | None = None,
    *,
    verify: Verify | None = None,
    now: float | None = None,
) -> list[_CacheDecision]:
    """Cache keys of a wave of steps whose inputs are all in ``produced``, and their hits (one
    query, then one ``verify`` call for the hits' objects)."""
    keyed = {inv: _key(by_id[inv], produced) for inv in wave}
    hits = q.cache_hits(s, {k for inv, (k, _) in keyed.items() if by_id[inv].enable_cache}, now=now)
    wanted = {reuse[i]: keyed[i][0] for i in wave if i in reuse} if reuse else {}
    reused = history.reusable(s, wanted, now=now)
    out = []
    for inv in wave:
        step, (key, ingr) = by_id[inv], keyed[inv]
        hit = hits.get(key) if step.enable_cache else None
        if reuse and reuse.get(inv) in reused:
            hit = reused[
                reuse[inv]
            ]  # a retry takes exactly the original's outputs, cache off or on
        if hit is not None and set(hit.outputs) != set(step.output_names()):
            hit = None  # the earlier run recorded other outputs: not reusable
        out.append(_CacheDecision(inv, key, ingr, hit))
    return _without_lost_objects(s, out, verify, now)


def _without_lost_objects(
    s: Session, decisions: list[_CacheDecision], verify: Verify | None, now: float | None
) -> list[_CacheDecision]:
    """Drop the hits with an output whose object is gone, marking those artifacts missing so
    that no later lookup offers them (the step runs instead)."""
    refs = [a for d in decisions if d.hit is not None for a in d.hit.outputs.values()]
    if verify is None or not refs:
        return decisions
    missing = verify(refs)
    if not missing:
        return decisions
    cache_rows.mark_checked(s, missing=sorted(missing), now=time.time() if now is None else now)
    return [
        replace(d, hit=None)
        if d.hit is not None and any(a.id in missing for a in d.hit.outputs.values())
        else d
        for d in decisions
    ]


def _fly(
    s: Session,
    decisions: list[_CacheDecision],
    ids: Mapping[str, str],
    run_id: str,
    by_id: dict[str, StepSpec],
    produced: dict[tuple[str, str], Any],
    *,
    verify: Verify | None,
    now: float,
) -> list[_CacheDecision]:
    """Board the flights of the decided steps that must compute (:func:`scheduler.flight.board`):
    each either computes, waits for the step run computing its key, or takes the hit that
    step run's commit just made."""
    wanted = [
        flight.Wanted(d.cache_key, ids[d.invocation_id], run_id)
        for d in decisions
        if d.hit is None and by_id[d.invocation_id].enable_cache
    ]
    if not wanted:
        return decisions
    by_key = {d.cache_key: d.invocation_id for d in decisions}

    def recheck(keys: Collection[str]) -> dict[str, q.CacheHit]:
        again = _decide(s, [by_key[k] for k in keys], by_id, produced, verify=verify, now=now)
        return {d.cache_key: d.hit for d in again if d.hit is not None}

    boarded = flight.board(s, wanted, now=now, recheck=recheck)
    out = []
    for d in decisions:
        b = boarded.get(ids[d.invocation_id])
        if b is not None and (b.hit is not None or b.waits_for is not None):
            d = replace(d, hit=b.hit, waits_for=b.waits_for)
        out.append(d)
    return out


def _cache_columns(d: _CacheDecision, now: float) -> dict[str, Any]:
    """The step-run columns a cache decision sets: ``cached`` with its origin, ``waiting`` for
    the step run computing its key, or ``ready``."""
    hit = d.hit
    status = StepStatus.CACHED if hit else StepStatus.WAITING if d.waits_for else StepStatus.READY
    return {
        "status": status.value,
        "cache_key": d.cache_key,
        "cache_ingredients": d.ingredients,
        "cached_from_run_id": hit.run_id if hit else None,
        "cached_from_step_run_id": hit.step_run_id if hit else None,
        "waits_for": None if hit else d.waits_for,
        "started_at": now if hit else None,
        "ended_at": now if hit else None,
    }


def _link_hit(
    step: StepSpec,
    step_run_id: str,
    run_id: str,
    hit: q.CacheHit,
    produced: dict[tuple[str, str], Any],
) -> list[dict[str, Any]]:
    """Lineage of a cache hit: the original artifacts as outputs (no copies), plus its inputs.
    Records the outputs in ``produced`` for the steps downstream."""
    edges = []
    for name, art in hit.outputs.items():
        produced[(step.invocation_id, name)] = art
        edges.append(lineage_edge(step_run_id, run_id, q.OUTPUT, name, 0, art.id))
    return edges + input_edges(step, step_run_id, run_id, produced)


def lineage_edge(
    step_run_id: str, run_id: str, direction: str, name: str, position: int, artifact_id: str
) -> dict[str, Any]:
    """A lineage row: ``step_run_id`` consumed (``input``) or produced (``output``) an artifact."""
    return {
        "step_run_id": step_run_id,
        "direction": direction,
        "name": name,
        "position": position,
        "artifact_id": artifact_id,
        "run_id": run_id,
    }


def input_edges(
    step: StepSpec, step_run_id: str, run_id: str, produced: dict[tuple[str, str], Any]
) -> list[dict[str, Any]]:
    """Lineage rows recording which artifacts a step run consumed."""
    return [
        lineage_edge(step_run_id, run_id, q.INPUT, i.name, pos, produced[(ref.step, ref.output)].id)
        for i in step.inputs
        for pos, ref in enumerate(i.refs)
    ]


def _resolve(
    s: Session,
    run_id: str,
    unblocked: Sequence[Any],
    *,
    window: int,
    now: float,
    known: dict[tuple[str, str], Any] | None = None,
    leaf: bool = True,
    verify: Verify | None = None,
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
        decided = _decide(s, list(ids), by_id, produced, verify=verify, now=now)
        if SPECS.flies(s, run_id):
            decided = _fly(s, decided, ids, run_id, by_id, produced, verify=verify, now=now)
        for d in decided:
            settled.append({"_id": ids[d.invocation_id], **_cache_columns(d, now)})
            if d.hit is not None:
                cached.append(d.invocation_id)
                edges += _link_hit(
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
    verify: Verify | None = None,
) -> list[QueuedStep] | None:
    """Commit a successful attempt and move the run on; None when the attempt had lost its lease.

    The steps waiting for this one (same cache key, other runs) are settled as cached from it
    in the same transaction, and their runs move on too; ``verify`` checks the objects of the
    cache hits that the downstream steps get (see :data:`Verify`).
    """
    values, log_lines = _split_log_lines(values)
    expires_s = SPECS.get(s, row.run_id)[1][row.invocation_id].cache_expires_after_s
    run_status = q.complete_attempt(
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
    _, by_id, downstream = SPECS.get(s, row.run_id)
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
    return landed + _resolve(
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
    verify: Verify | None = None,
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
            edges += _link_hit(by_id[w.invocation_id], w.id, run_id, hit, produced)
        q.add_lineage(s, edges)
        for w in waiting:  # one by one: two waiters may share a downstream step
            unblocked += q.decrement_deps(s, run_id, downstream[w.invocation_id])
        out += _resolve(s, run_id, unblocked, window=window, now=now, known=produced, verify=verify)
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
        if not q.finish_attempt(
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
    if not q.finish_attempt(
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
    current = q.holder(s, row.id)
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
    if not q.finish_attempt(
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
        stopped = [r.id for r in q.stop_steps(s, run_id, Move.SKIP, now)]
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
    unstarted = q.stop_steps(s, run_id, Move.CANCEL, now, only=UNSTARTED)
    running = q.stop_steps(s, run_id, Move.CANCEL, now, only=(StepStatus.RUNNING,))
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
