"""Managing the shared cache: listing, clearing and garbage-collecting cached step outputs.

``Client().list_cache()`` shows the cache entries (completed step runs with a cache key: what
a later identical step may reuse), ``clear_cache()`` stops offering some of them (their history
stays), ``gc(older_than)`` deletes the artifacts that no kept run refers to (metadata first,
in one transaction, then the objects), and ``check_artifacts()`` reads every object back and
marks the ones that are gone or altered, which are then never a cache hit. The record-level
rules are in :mod:`stores.metadata.cache`. Nothing here imports SQLAlchemy at import time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from zenml_workers.errors import CacheError

if TYPE_CHECKING:
    from zenml_workers.sdk.client import RunView
    from zenml_workers.sdk.stack import Stack

#: Seconds gc waits, on PostgreSQL, between no longer offering the entries it will delete and
#: deleting them: a run being planned that read such an entry a moment before links it within
#: milliseconds, and gc then sees the link and keeps the artifact. (SQLite serialises writers.)
SETTLE_S = 1.0
#: Times the deleting transaction is tried when a run linked one of its artifacts meanwhile.
GC_TRIES = 5
#: Objects read at once by ``check_artifacts``.
CHECK_THREADS = 8


@dataclass(frozen=True)
class CacheEntryView:
    """A cache entry: the outputs of a completed step run that an identical step may reuse.

    Attributes:
        cache_key: ``sha256:<hex>`` of the step's code, parameters and input hashes.
        size_bytes: the sum of its outputs' sizes.
        hits: step runs that reused it; ``last_used_at`` when the latest ended (epoch s).
        created_at: when its outputs were committed (epoch s).
        expires_at: when it stops being offered (epoch s; None: never).
        state: ``live`` (offered), ``expired`` (cleared or past its expiry) or ``lost`` (an
            output's object is gone or altered).
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
    state: str


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` deleted (or, with ``dry_run``, would delete).

    Attributes:
        cutoff: runs that ended before this (epoch s) are not kept.
        artifacts: artifacts deleted (metadata and object), or that would be.
        size_bytes: their total size.
        in_use: artifacts that a run linked while gc ran, so were kept after all.
        failed_uris: objects whose delete failed after their metadata was deleted (left
            behind as unreferenced objects; nothing refers to them any more).
    """

    dry_run: bool
    cutoff: float
    artifacts: int
    size_bytes: int
    in_use: int = 0
    failed_uris: tuple[str, ...] = ()


@dataclass(frozen=True)
class LostArtifact:
    """An artifact whose object ``check_artifacts`` found gone or altered."""

    id: str
    name: str
    uri: str
    producer_run_id: str
    problem: str  # "missing" or "corrupted"


@dataclass(frozen=True)
class CheckReport:
    """What ``check_artifacts`` found: ``checked`` objects read, the lost ones, and how many
    marked ones were found back intact (their marks removed)."""

    checked: int
    lost: tuple[LostArtifact, ...]
    restored: int

    @property
    def missing(self) -> tuple[LostArtifact, ...]:
        return tuple(a for a in self.lost if a.problem == "missing")

    @property
    def corrupted(self) -> tuple[LostArtifact, ...]:
        return tuple(a for a in self.lost if a.problem == "corrupted")


def period_seconds(value: str | timedelta | float, what: str) -> float:
    """Seconds in ``value``: ``"30m"``, ``"12h"``, ``"7d"`` (s, m, h, d, w), a ``timedelta``
    or a number of seconds (0 allowed: everything that ended before now).

    Raises:
        CacheError: ``value`` is none of these, or negative.
    """
    from stores.periods import seconds_in

    seconds = seconds_in(value)
    if seconds is None or not 0 <= seconds < float("inf"):
        raise CacheError(
            f"{what}={value!r} is not an age; give a number and a unit such as 30m, 12h or 7d "
            "(s, m, h, d, w), a timedelta or seconds"
        )
    return seconds


def why_not_offered(stack: Stack, cache_key: str, *, at: float) -> str:
    """Why a step whose cache key an earlier step run shares was no hit at ``at`` (when it was
    decided, epoch s): that entry was cleared or expired, its outputs were lost, or no earlier
    step run with the key had finished.

    Raises:
        MetadataStoreError: the metadata store cannot be read.
    """
    from stores.metadata import cache as mc

    with stack.metadata.read() as s:
        entries = mc.list_entries(s, now=at, cache_key=cache_key, include_expired=True)
    earlier = [e for e in entries if e.created_at <= at]
    if not earlier:
        return (
            "an earlier run had the same cache key but had not finished this step when it was "
            "decided, so there was nothing to reuse"
        )
    newest = earlier[0]
    state = newest.state(at)
    if state == "lost":
        return (
            f"the outputs of run {newest.run_id} (same cache key) are lost from the artifact "
            "store (see `zw gc --check`), so the step ran again"
        )
    if state == "expired":
        return (
            f"the cache entry of run {newest.run_id} (same cache key) was cleared (`zw cache "
            "clear`) or past its cache_expires_after, so the step ran again"
        )
    return "same cache key as an earlier run, but caching was disabled for this step"


class CacheMixin:
    """``Client`` methods for the cache (``list_cache``, ``clear_cache``, ``gc``,
    ``check_artifacts``)."""

    _stack: Stack

    if TYPE_CHECKING:

        def get_run(self, run_id: str) -> RunView: ...

    def list_cache(
        self,
        pipeline: str | None = None,
        step: str | None = None,
        *,
        include_expired: bool = False,
        limit: int | None = None,
        now: float | None = None,
    ) -> list[CacheEntryView]:
        """The cache entries, newest first: only those offered as a hit, unless
        ``include_expired`` (then cleared, expired and lost ones too, with their ``state``).

        Args:
            pipeline: only entries of runs of this pipeline.
            step: only entries of this step (invocation id or step name).
            limit: at most this many (the newest).
            now: the time to judge expiry at, epoch seconds (default: the clock).

        Raises:
            MetadataStoreError: the metadata store cannot be read.
        """
        from stores.metadata import cache as mc

        at = time.time() if now is None else now
        with self._stack.metadata.read() as s:
            entries = mc.list_entries(
                s,
                now=at,
                pipeline=pipeline,
                step=step,
                include_expired=include_expired,
                limit=limit,
            )
        return [
            CacheEntryView(
                step_run_id=e.step_run_id,
                cache_key=e.cache_key,
                pipeline=e.pipeline,
                step=e.step,
                run_id=e.run_id,
                user=e.user,
                outputs=e.outputs,
                size_bytes=e.size_bytes,
                hits=e.hits,
                last_used_at=e.last_used_at,
                created_at=e.created_at,
                expires_at=e.expires_at,
                state=e.state(at),
            )
            for e in entries
        ]

    def clear_cache(
        self,
        *,
        pipeline: str | None = None,
        step: str | None = None,
        run: str | RunView | None = None,
        older_than: str | timedelta | float | None = None,
        now: float | None = None,
    ) -> int:
        """Stop offering the matching cache entries (all of them with no filter), so the next
        identical step computes again. Their history stays: runs still show them and
        ``explain_cache`` still explains them.

        Args:
            pipeline: entries of runs of this pipeline.
            step: entries of this step (invocation id or step name).
            run: entries made by this run (an id, a unique prefix of one, or a view).
            older_than: entries committed longer ago than this (``"7d"``, timedelta, seconds).
            now: epoch seconds (default: the clock).

        Returns:
            How many entries were offered before and no longer are.

        Raises:
            CacheError: ``older_than`` is not an age.
            NotFoundError: ``run`` names no run.
        """
        from stores.metadata import cache as mc

        at = time.time() if now is None else now
        before = None if older_than is None else at - period_seconds(older_than, "older_than")
        run_id = None
        if run is not None:
            run_id = run.id if not isinstance(run, str) else self.get_run(run).id
        with self._stack.metadata.transaction() as s:
            return mc.clear_entries(
                s, now=at, pipeline=pipeline, step=step, run_id=run_id, ended_before=before
            )

    def gc(
        self,
        older_than: str | timedelta | float,
        *,
        dry_run: bool = False,
        now: float | None = None,
        settle_s: float | None = None,
    ) -> GcReport:
        """Delete the artifacts that no kept run refers to, metadata and object together.

        A run is kept while it is running and when it ended less than ``older_than`` ago;
        what a kept run's step was cached from is one of its outputs, so it stays. Runs and
        step runs themselves are never deleted (history, ``explain_cache`` and ``diff`` keep
        working); the entries whose outputs go are no longer offered as cache hits. The
        metadata goes first, in one transaction that checks again that nothing refers to each
        artifact (a run planned meanwhile keeps what it linked); the objects after it commits.

        Args:
            older_than: ``"30d"``, a timedelta or seconds.
            dry_run: only say what would go.
            now: epoch seconds (default: the clock).
            settle_s: seconds between no longer offering the doomed entries and deleting
                (default :data:`SETTLE_S` on PostgreSQL, 0 on SQLite).

        Raises:
            CacheError: ``older_than`` is not an age, or runs kept linking the artifacts gc
                was deleting (run it again).
            MetadataStoreError: the metadata store cannot be reached.
        """
        from sqlalchemy.exc import IntegrityError

        from stores.metadata import cache as mc

        at = time.time() if now is None else now
        cutoff = at - period_seconds(older_than, "older_than")
        store = self._stack.metadata
        if dry_run:
            with store.read() as s:
                garbage = mc.find_garbage(s, before=cutoff)
            return GcReport(True, cutoff, len(garbage), sum(g.size_bytes for g in garbage))
        with store.transaction() as s:
            garbage = mc.find_garbage(s, before=cutoff)
            mc.expire_producers(s, garbage, now=at)
        if not garbage:
            return GcReport(False, cutoff, 0, 0)
        settle = (0.0 if store.is_sqlite else SETTLE_S) if settle_s is None else settle_s
        if settle > 0:
            time.sleep(settle)
        for _ in range(GC_TRIES):
            try:
                with store.transaction() as s:
                    doomed = mc.find_garbage(s, before=cutoff, among=[g.id for g in garbage])
                    uris = mc.delete_artifacts(s, doomed, before=cutoff)
                break
            except IntegrityError:
                continue  # a run linked one of them while this deleted: look again
        else:
            raise CacheError(
                f"gc could not delete {len(garbage)} artifacts because runs kept linking them "
                f"in the metadata store {store.redacted_url}; run `zw gc` again when fewer "
                "runs are being planned"
            )
        failed = tuple(self._delete_objects(uris))
        return GcReport(
            False,
            cutoff,
            len(doomed),
            sum(g.size_bytes for g in doomed),
            in_use=len(garbage) - len(doomed),
            failed_uris=failed,
        )

    def _delete_objects(self, uris: list[str]) -> list[str]:
        """Delete the objects at ``uris`` (their metadata is gone); returns those that failed."""
        import logging

        from stores.errors import ArtifactStoreError
        from zenml_workers.sdk.client import _store_for

        failed = []
        for uri in uris:
            try:
                _store_for(self._stack, uri).delete(uri)
            except ArtifactStoreError as e:
                logging.getLogger("zenml_workers.gc").warning("could not delete %s: %s", uri, e)
                failed.append(uri)
        return failed

    def check_artifacts(self, *, now: float | None = None) -> CheckReport:
        """Read every artifact's object back and compare it with the hash and size recorded
        when it was written: the gone ones are marked ``missing``, the altered ones
        ``corrupted`` (marks a step run's outputs out of the cache, so the step simply runs
        next time); marked ones found intact again lose their marks.

        Raises:
            ArtifactStoreError: the artifact store cannot be reached or read (what was
                checked before is recorded).
            MetadataStoreError: the metadata store cannot be reached.
        """
        from concurrent.futures import ThreadPoolExecutor

        from stores.metadata import cache as mc

        at = time.time() if now is None else now
        checked, lost, restored, after = 0, [], 0, ""
        with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="zw-check") as pool:
            while True:
                with self._stack.metadata.read() as s:
                    page = mc.all_artifacts(s, after_id=after)
                if not page:
                    break
                found = list(pool.map(self._check_object, page))
                problems = [
                    LostArtifact(a.id, a.name, a.uri, a.producer_run_id, p)
                    for a, p in zip(page, found, strict=True)
                    if p is not None
                ]
                back = [
                    a.id
                    for a, p in zip(page, found, strict=True)
                    if p is None and (a.missing_at is not None or a.corrupted_at is not None)
                ]
                with self._stack.metadata.transaction() as s:
                    mc.mark_checked(
                        s,
                        missing=[a.id for a in problems if a.problem == "missing"],
                        corrupted=[a.id for a in problems if a.problem == "corrupted"],
                        intact=back,
                        now=at,
                    )
                checked, restored, after = checked + len(page), restored + len(back), page[-1].id
                lost.extend(problems)
        return CheckReport(checked, tuple(lost), restored)

    def _check_object(self, art: Any) -> str | None:
        """``"missing"``, ``"corrupted"`` or None (intact) for one artifact's object."""
        from stores.errors import ArtifactIntegrityError, ArtifactNotFoundError
        from zenml_workers.sdk.client import _store_for

        store = _store_for(self._stack, art.uri)
        try:
            # The whole object is read and hashed when the block ends.
            with store.verified_reader(
                art.uri, expected_hash=art.content_hash, expected_size_bytes=art.size_bytes
            ):
                pass
        except ArtifactNotFoundError:
            return "missing"
        except ArtifactIntegrityError:
            return "corrupted"
        return None
