"""Reading recorded runs back: their latest spec, their code blobs, and step runs to reuse.

What retrying, rerunning, copying and comparing runs need from the metadata store; each
function takes the caller's session.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from stores.metadata import statements as sql
from stores.metadata.models import CodeBlobRow, RunRow
from stores.metadata.queries import ArtifactRef, CacheHit

STEPS = sql.STEPS


def latest_run(s: Session, pipeline_name: str) -> RunRow | None:
    """The newest run of the pipeline with this name, whatever its status (None: no run)."""
    return s.execute(
        select(RunRow)
        .where(RunRow.pipeline_name == pipeline_name)
        .order_by(RunRow.created_at.desc())
        .limit(1)
    ).scalar_one_or_none()


def code_blobs(s: Session, code_hashes: Iterable[str]) -> dict[str, CodeBlobRow]:
    """The stored code blobs with these hashes, by hash (absent ones are left out)."""
    hashes = sorted(set(code_hashes))
    if not hashes:
        return {}
    rows = s.execute(select(CodeBlobRow).where(CodeBlobRow.code_hash.in_(hashes))).scalars()
    return {r.code_hash: r for r in rows}


def code_sources(s: Session, code_hashes: Iterable[str]) -> dict[str, str]:
    """The source text recorded with each code blob, by hash (without the pickled bytes)."""
    hashes = sorted(set(code_hashes))
    if not hashes:
        return {}
    rows = s.execute(
        select(CodeBlobRow.code_hash, CodeBlobRow.source).where(CodeBlobRow.code_hash.in_(hashes))
    )
    return {h: src or "" for h, src in rows}


def reusable(
    s: Session, wanted: Mapping[str, str], *, now: float | None = None
) -> dict[str, CacheHit]:
    """The step runs of ``wanted`` (step run id -> the cache key it must have) whose outputs
    may be reused, by step run id: completed with that key, not expired at ``now`` (epoch
    seconds, default the clock), no output corrupt or missing (the cache's own query)."""
    if not wanted:
        return {}
    at = time.time() if now is None else now
    rows = s.connection().execute(
        sql.CACHE_HITS.where(STEPS.c.id.in_(sorted(wanted))),
        {"keys": sorted(set(wanted.values())), "now": at},
    )
    out: dict[str, CacheHit] = {}
    for r in rows:
        if wanted.get(r.id) != r.cache_key:
            continue
        hit = out.setdefault(r.id, CacheHit(r.id, r.run_id, r.ended_at or 0.0, {}))
        if r.name is not None:
            hit.outputs[r.name] = ArtifactRef(
                r.artifact_id, r.content_hash, r.uri, r.materializer, r.data_type
            )
    return out


def step_sources(s: Session, run_id: str) -> dict[str, tuple[str, str, str | None]]:
    """A run's steps as ``{invocation_id: (step_run_id, status, cached_from_step_run_id)}``."""
    rows = s.connection().execute(
        select(STEPS.c.invocation_id, STEPS.c.id, STEPS.c.status, STEPS.c.cached_from_step_run_id)
        .where(STEPS.c.run_id == run_id)
        .order_by(STEPS.c.position)
    )
    return {r.invocation_id: (r.id, r.status, r.cached_from_step_run_id) for r in rows}
