"""The shared cache as records: entries to list and clear, artifacts to collect and check.

A *cache entry* is a completed (never cached) step run with a cache key: the step runs that
reused it have ``cached_from_step_run_id`` pointing at it (its *hits*). An entry is offered
as a cache hit (``statements.CACHE_HITS``) until ``cache_expires_at`` passes and while none
of its outputs is marked ``corrupted_at`` or ``missing_at``. Clearing an entry sets its
``cache_expires_at`` to now: its history (and ``explain_cache``) stays.

Garbage collection (:func:`find_garbage`, :func:`delete_artifacts`): a run is *kept* when it
is still running or ended at or after the cutoff; an artifact is garbage when it was created
before the cutoff and no lineage edge of a kept run refers to it. A kept run's cache hits
link the original artifacts as its outputs, so what a recent run reused stays, and with it
the entry it came from. Runs and step runs are never deleted, only artifacts and their
lineage edges. All times are epoch seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from stores.metadata.statements import ARTIFACTS, LINEAGE, OUTPUT, RUNS, STEPS
from stores.metadata.states import RunStatus, StepStatus

#: Ids per ``IN (...)`` list, well below SQLite's and PostgreSQL's parameter limits.
CHUNK = 500


@dataclass(frozen=True)
class CacheEntry:
    """One cache entry: a completed step run with a cache key, and how it has been used.

    Attributes:
        size_bytes: the sum of its outputs' sizes.
        hits: step runs that reused it; ``last_used_at`` is when the latest of them ended.
        created_at: when the step run ended (its outputs committed).
        expires_at: when it stops being offered (None: never).
        lost: one of its outputs was found gone from the artifact store or altered.
    """

    step_run_id: str
    cache_key: str
    pipeline: str
    step: str
    run_id: str
    user: str
    outputs: int
    size_bytes: int
    hits: int
    last_used_at: float | None
    created_at: float
    expires_at: float | None
    lost: bool

    def state(self, now: float) -> str:
        """``live`` (offered as a hit), ``expired`` (cleared or past its expiry) or ``lost``."""
        if self.lost:
            return "lost"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "live"


@dataclass(frozen=True)
class GarbageArtifact:
    """An artifact that garbage collection may delete."""

    id: str
    uri: str
    size_bytes: int
    producer_step_run_id: str


_HITS = STEPS.alias("hits")
_OUT = LINEAGE.alias("entry_out")
_ART = ARTIFACTS.alias("entry_art")
_ENTRY = and_(STEPS.c.status == StepStatus.COMPLETED.value, STEPS.c.cache_key.is_not(None))


def _not_expired(now: float) -> Any:
    return or_(STEPS.c.cache_expires_at.is_(None), STEPS.c.cache_expires_at > now)


def _filters(
    pipeline: str | None, step: str | None, run_id: str | None, ended_before: float | None
) -> list[Any]:
    """Conditions on ``step_runs`` narrowing entries to a pipeline, step (invocation id or step
    name), run and age; none given: every entry."""
    out: list[Any] = []
    if pipeline is not None:
        out.append(STEPS.c.run_id.in_(select(RUNS.c.id).where(RUNS.c.pipeline_name == pipeline)))
    if step is not None:
        out.append(or_(STEPS.c.invocation_id == step, STEPS.c.step_name == step))
    if run_id is not None:
        out.append(STEPS.c.run_id == run_id)
    if ended_before is not None:
        out.append(STEPS.c.ended_at < ended_before)
    return out


def list_entries(
    s: Session,
    *,
    now: float,
    pipeline: str | None = None,
    step: str | None = None,
    run_id: str | None = None,
    cache_key: str | None = None,
    include_expired: bool = False,
    limit: int | None = None,
) -> list[CacheEntry]:
    """Cache entries, newest first: only those offered as a hit unless ``include_expired``.

    ``step`` matches the invocation id or the step name. Hits are counted through the index
    on ``cached_from_step_run_id``, sizes through the lineage of each entry.
    """
    outputs = and_(_OUT.c.step_run_id == STEPS.c.id, _OUT.c.direction == OUTPUT)
    size = (
        select(func.coalesce(func.sum(_ART.c.size_bytes), 0))
        .select_from(_OUT.join(_ART, _ART.c.id == _OUT.c.artifact_id))
        .where(outputs)
        .scalar_subquery()
    )
    n_outputs = select(func.count()).select_from(_OUT).where(outputs).scalar_subquery()
    lost = (
        select(_OUT.c.artifact_id)
        .select_from(_OUT.join(_ART, _ART.c.id == _OUT.c.artifact_id))
        .where(outputs, or_(_ART.c.corrupted_at.is_not(None), _ART.c.missing_at.is_not(None)))
        .exists()
    )
    reused = _HITS.c.cached_from_step_run_id == STEPS.c.id
    hits = select(func.count()).select_from(_HITS).where(reused).scalar_subquery()
    last_used = select(func.max(_HITS.c.ended_at)).where(reused).scalar_subquery()
    q = (
        select(
            STEPS.c.id,
            STEPS.c.cache_key,
            RUNS.c.pipeline_name,
            STEPS.c.invocation_id,
            STEPS.c.run_id,
            RUNS.c.user,
            n_outputs.label("n_outputs"),
            size.label("size_bytes"),
            hits.label("hits"),
            last_used.label("last_used_at"),
            STEPS.c.ended_at,
            STEPS.c.cache_expires_at,
            lost.label("lost"),
        )
        .select_from(STEPS.join(RUNS, RUNS.c.id == STEPS.c.run_id))
        .where(_ENTRY, *_filters(pipeline, step, run_id, None))
        .order_by(STEPS.c.ended_at.desc(), STEPS.c.id)
    )
    if cache_key is not None:
        q = q.where(STEPS.c.cache_key == cache_key)
    if not include_expired:
        q = q.where(_not_expired(now), ~lost)
    if limit is not None:
        q = q.limit(limit)
    return [
        CacheEntry(
            step_run_id=r.id,
            cache_key=r.cache_key,
            pipeline=r.pipeline_name,
            step=r.invocation_id,
            run_id=r.run_id,
            user=r.user or "",
            outputs=int(r.n_outputs or 0),
            size_bytes=int(r.size_bytes or 0),
            hits=int(r.hits or 0),
            last_used_at=r.last_used_at,
            created_at=r.ended_at or 0.0,
            expires_at=r.cache_expires_at,
            lost=bool(r.lost),
        )
        for r in s.connection().execute(q)
    ]


def clear_entries(
    s: Session,
    *,
    now: float,
    pipeline: str | None = None,
    step: str | None = None,
    run_id: str | None = None,
    ended_before: float | None = None,
) -> int:
    """Stop offering the matching entries as cache hits (``cache_expires_at = now``); returns
    how many were still offered. With no filter, every entry."""
    res = s.connection().execute(
        update(STEPS)
        .where(_ENTRY, _not_expired(now), *_filters(pipeline, step, run_id, ended_before))
        .values(cache_expires_at=now)
    )
    return int(res.rowcount or 0)


# -- garbage collection ---------------------------------------------------------------------


def _kept_run(before: float) -> Any:
    """A run gc keeps everything of: still running (or never ended) or ended at/after ``before``."""
    return or_(
        RUNS.c.status == RunStatus.RUNNING.value,
        RUNS.c.ended_at.is_(None),
        RUNS.c.ended_at >= before,
    )


def _garbage_query(before: float) -> Any:
    referenced = (
        select(LINEAGE.c.artifact_id)
        .select_from(LINEAGE.join(RUNS, RUNS.c.id == LINEAGE.c.run_id))
        .where(LINEAGE.c.artifact_id == ARTIFACTS.c.id, _kept_run(before))
        .exists()
    )
    return select(
        ARTIFACTS.c.id, ARTIFACTS.c.uri, ARTIFACTS.c.size_bytes, ARTIFACTS.c.producer_step_run_id
    ).where(ARTIFACTS.c.created_at < before, ~referenced)


def find_garbage(
    s: Session, *, before: float, among: Iterable[str] | None = None
) -> list[GarbageArtifact]:
    """Artifacts created before ``before`` that no lineage edge of a kept run refers to
    (see the module docstring), oldest first; with ``among``, only those of these ids (the
    re-check inside the deleting transaction)."""
    q = _garbage_query(before).order_by(ARTIFACTS.c.created_at, ARTIFACTS.c.id)
    if among is None:
        rows: Sequence[Any] = s.connection().execute(q).all()
    else:
        ids, rows = list(among), []
        for i in range(0, len(ids), CHUNK):
            chunk = q.where(ARTIFACTS.c.id.in_(ids[i : i + CHUNK]))
            rows = [*rows, *s.connection().execute(chunk).all()]
    return [GarbageArtifact(r.id, r.uri, int(r.size_bytes), r.producer_step_run_id) for r in rows]


def expire_producers(s: Session, garbage: Sequence[GarbageArtifact], *, now: float) -> int:
    """Stop offering the entries that produced ``garbage`` as cache hits, before it is deleted:
    a run planned from now on no longer links it. Returns how many were still offered."""
    ids = sorted({g.producer_step_run_id for g in garbage})
    n = 0
    for i in range(0, len(ids), CHUNK):
        res = s.connection().execute(
            update(STEPS)
            .where(STEPS.c.id.in_(ids[i : i + CHUNK]), _ENTRY, _not_expired(now))
            .values(cache_expires_at=now)
        )
        n += int(res.rowcount or 0)
    return n


def delete_artifacts(s: Session, garbage: Sequence[GarbageArtifact], *, before: float) -> list[str]:
    """Delete the rows of ``garbage`` and the lineage edges of runs not kept (see
    :func:`find_garbage`) to them; returns the URIs that no remaining artifact row names, whose
    objects the caller deletes after the commit.

    An edge of a kept run is never deleted, so an artifact one refers to (a run linked it
    since it was found) makes the delete fail on the ``lineage.artifact_id`` foreign key, and
    so does a lineage row being inserted concurrently (PostgreSQL waits for its transaction
    first): the caller rolls back and looks again.

    Raises:
        sqlalchemy.exc.IntegrityError: a kept run refers to one of ``garbage``.
    """
    ids = [g.id for g in garbage]
    c = s.connection()
    kept = select(RUNS.c.id).where(RUNS.c.id == LINEAGE.c.run_id, _kept_run(before)).exists()
    for i in range(0, len(ids), CHUNK):
        chunk = ids[i : i + CHUNK]
        c.execute(delete(LINEAGE).where(LINEAGE.c.artifact_id.in_(chunk), ~kept))
        c.execute(delete(ARTIFACTS).where(ARTIFACTS.c.id.in_(chunk)))
    uris = sorted({g.uri for g in garbage})
    still: set[str] = set()
    for i in range(0, len(uris), CHUNK):
        still |= set(
            c.execute(select(ARTIFACTS.c.uri).where(ARTIFACTS.c.uri.in_(uris[i : i + CHUNK])))
            .scalars()
            .all()
        )
    return [u for u in uris if u not in still]


# -- checking objects -----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredArtifact:
    """What checking an artifact's object needs: where it is and what it must hash to."""

    id: str
    name: str
    uri: str
    content_hash: str
    size_bytes: int
    producer_run_id: str
    missing_at: float | None
    corrupted_at: float | None


def all_artifacts(s: Session, *, after_id: str = "", limit: int = 1000) -> list[StoredArtifact]:
    """Artifacts in id order after ``after_id``, a page at a time (so a check of millions of
    objects does not hold them all)."""
    rows = s.connection().execute(
        select(
            ARTIFACTS.c.id,
            ARTIFACTS.c.name,
            ARTIFACTS.c.uri,
            ARTIFACTS.c.content_hash,
            ARTIFACTS.c.size_bytes,
            ARTIFACTS.c.producer_run_id,
            ARTIFACTS.c.missing_at,
            ARTIFACTS.c.corrupted_at,
        )
        .where(ARTIFACTS.c.id > after_id)
        .order_by(ARTIFACTS.c.id)
        .limit(limit)
    )
    return [
        StoredArtifact(
            r.id,
            r.name,
            r.uri,
            r.content_hash,
            int(r.size_bytes),
            r.producer_run_id,
            r.missing_at,
            r.corrupted_at,
        )
        for r in rows
    ]


def mark_checked(
    s: Session,
    *,
    missing: Sequence[str] = (),
    corrupted: Sequence[str] = (),
    intact: Sequence[str] = (),
    now: float,
) -> None:
    """Record a check: ``missing`` and ``corrupted`` artifacts get their time (the first one
    found is kept), so they are never a cache hit again; ``intact`` ones (the object is back,
    byte for byte) lose both marks."""
    c = s.connection()
    for column, ids in (("missing_at", missing), ("corrupted_at", corrupted)):
        col = ARTIFACTS.c[column]
        for i in range(0, len(ids), CHUNK):
            c.execute(
                update(ARTIFACTS)
                .where(ARTIFACTS.c.id.in_(list(ids[i : i + CHUNK])), col.is_(None))
                .values({column: now})
            )
    for i in range(0, len(intact), CHUNK):
        c.execute(
            update(ARTIFACTS)
            .where(ARTIFACTS.c.id.in_(list(intact[i : i + CHUNK])))
            .values(missing_at=None, corrupted_at=None)
        )
