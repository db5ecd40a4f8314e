"""Cache decisions for steps whose inputs all exist: their keys, the hits they may reuse (a
teammate's, a retried run's own, never one whose objects are lost), and the single-flight
boarding of those that must compute.

Pure functions of the caller's session; :mod:`scheduler.dispatch` records what they decide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.orm import Session

from scheduler import cache, flight
from scheduler.specs import PipelineSpec, StepSpec
from stores.metadata import cache as cache_rows
from stores.metadata import history
from stores.metadata import queries as q
from stores.metadata.states import StepStatus


def read_hit_outputs(
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


def cache_key_of(
    step: StepSpec, produced: dict[tuple[str, str], Any]
) -> tuple[str, dict[str, Any]]:
    hashes = {
        i.name: [produced[(r.step, r.output)].content_hash for r in i.refs] for i in step.inputs
    }
    ingr = cache.ingredients(step, hashes)
    return cache.cache_key(ingr), ingr


@dataclass(frozen=True)
class CacheDecision:
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


def decide(
    s: Session,
    wave: Sequence[str],
    by_id: dict[str, StepSpec],
    produced: dict[tuple[str, str], Any],
    reuse: Mapping[str, str] | None = None,
    *,
    verify: Verify | None = None,
    now: float | None = None,
) -> list[CacheDecision]:
    """Cache keys of a wave of steps whose inputs are all in ``produced``, and their hits (one
    query, then one ``verify`` call for the hits' objects)."""
    keyed = {inv: cache_key_of(by_id[inv], produced) for inv in wave}
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
        out.append(CacheDecision(inv, key, ingr, hit))
    return without_lost_objects(s, out, verify, now)


def without_lost_objects(
    s: Session, decisions: list[CacheDecision], verify: Verify | None, now: float | None
) -> list[CacheDecision]:
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


def fly(
    s: Session,
    decisions: list[CacheDecision],
    ids: Mapping[str, str],
    run_id: str,
    by_id: dict[str, StepSpec],
    produced: dict[tuple[str, str], Any],
    *,
    verify: Verify | None,
    now: float,
) -> list[CacheDecision]:
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
        again = decide(s, [by_key[k] for k in keys], by_id, produced, verify=verify, now=now)
        return {d.cache_key: d.hit for d in again if d.hit is not None}

    boarded = flight.board(s, wanted, now=now, recheck=recheck)
    out = []
    for d in decisions:
        b = boarded.get(ids[d.invocation_id])
        if b is not None and (b.hit is not None or b.waits_for is not None):
            d = replace(d, hit=b.hit, waits_for=b.waits_for)
        out.append(d)
    return out


def cache_columns(d: CacheDecision, now: float) -> dict[str, Any]:
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


def link_hit(
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
