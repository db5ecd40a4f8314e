"""Single-flight rows: which step run computes a cache key, and the step runs waiting for it.

A ``cache_flights`` row names the step run that computes (or last computed) a cache key. It
is inserted with ``INSERT ... ON CONFLICT DO NOTHING``, so two transactions planning the same
key serialise on its primary key, and the loser looks up the owner with a share lock on the
owner's step row: either the owner's commit waits for the loser's transaction (and then sees
its new waiter), or the loser waits for the owner's commit (and then finds it completed).

The row stays after its owner commits: a planner whose cache lookup ran just before that
commit still conflicts, finds the owner completed and looks the cache up again, instead of
computing. An owner that ended without outputs (failed, skipped, cancelled) or whose row is
gone is replaced by a guarded ``UPDATE`` (:func:`seize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from stores.metadata import statements as sql
from stores.metadata.models import CacheFlightRow
from stores.metadata.states import Move, StepStatus, sources, target

FLIGHTS = cast(Table, CacheFlightRow.__table__)
STEPS = sql.STEPS
_OWNER = STEPS.alias("owner")


@dataclass(frozen=True)
class Owner:
    """The step run a flight row names, as a planner that lost the insert sees it."""

    cache_key: str
    step_run_id: str
    run_id: str
    #: Its step status; None when the step run is gone (its run was deleted).
    status: str | None

    def computing(self) -> bool:
        """Still able to produce the key's outputs (not finished)."""
        return self.status is not None and not StepStatus(self.status).is_terminal()


def _insert(dialect: str) -> Any:
    make = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        make(FLIGHTS)
        .on_conflict_do_nothing(index_elements=[FLIGHTS.c.cache_key])
        .returning(FLIGHTS.c.cache_key)
    )


_INSERTS = {name: _insert(name) for name in ("postgresql", "sqlite")}
#: The owners of flight rows, with a share lock on each owner's step row (PostgreSQL; SQLite
#: writers are serialised anyway), so its commit cannot pass a waiter being added.
_OWNERS = (
    select(FLIGHTS.c.cache_key, FLIGHTS.c.step_run_id, FLIGHTS.c.run_id, STEPS.c.status)
    .join(STEPS, STEPS.c.id == FLIGHTS.c.step_run_id)
    .where(FLIGHTS.c.cache_key.in_(bindparam("keys", expanding=True)))
    .with_for_update(read=True, of=STEPS)
)
_NAMED = select(FLIGHTS.c.cache_key, FLIGHTS.c.step_run_id, FLIGHTS.c.run_id).where(
    FLIGHTS.c.cache_key.in_(bindparam("keys", expanding=True))
)
_SEIZE = (
    update(FLIGHTS)
    .where(FLIGHTS.c.cache_key == bindparam("f_key"), FLIGHTS.c.step_run_id == bindparam("f_old"))
    .values(
        step_run_id=bindparam("f_new"), run_id=bindparam("f_run"), started_at=bindparam("f_now")
    )
)
#: Settle every step waiting for an owner that just committed: cached from it.
_LAND = (
    update(STEPS)
    .where(
        STEPS.c.waits_for == bindparam("l_owner"),
        sql.status_guard(Move.LAND),
    )
    .values(
        status=target(Move.LAND),
        waits_for=None,
        cached_from_run_id=bindparam("l_run"),
        cached_from_step_run_id=bindparam("l_step"),
        started_at=bindparam("l_now"),
        ended_at=bindparam("l_now"),
    )
    .returning(STEPS.c.id, STEPS.c.run_id, STEPS.c.invocation_id)
)
_WAITERS = (
    select(STEPS.c.id, STEPS.c.run_id, STEPS.c.waits_for, STEPS.c.cache_key)
    .where(
        STEPS.c.waits_for.in_(bindparam("owners", expanding=True)),
        STEPS.c.status == StepStatus.WAITING.value,
    )
    .order_by(STEPS.c.waits_for, STEPS.c.id)
    .with_for_update()
)
#: Waiting steps whose owner finished or is gone (what no transaction should leave behind).
_ORPHANS = (
    select(
        STEPS.c.id,
        STEPS.c.waits_for,
        _OWNER.c.status.label("owner_status"),
        _OWNER.c.run_id.label("owner_run_id"),
        _OWNER.c.invocation_id.label("owner_invocation_id"),
    )
    .select_from(STEPS.outerjoin(_OWNER, _OWNER.c.id == STEPS.c.waits_for))
    .where(
        STEPS.c.status == StepStatus.WAITING.value,
        or_(_OWNER.c.id.is_(None), _OWNER.c.status.in_(sql.TERMINAL)),
    )
)


def insert(s: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert flight rows (``cache_key``, ``step_run_id``, ``run_id``, ``started_at``) whose
    key has none yet, in key order (so concurrent planners lock keys in one order); returns
    the keys inserted. On PostgreSQL a key inserted by a transaction still open waits for it."""
    if not rows:
        return set()
    stmt = _INSERTS["postgresql" if s.get_bind().dialect.name == "postgresql" else "sqlite"]
    ordered = sorted(rows, key=lambda r: r["cache_key"])
    if len(ordered) == 1:
        return set(s.connection().execute(stmt.values(ordered[0])).scalars())
    return set(s.connection().execute(stmt.values(ordered)).scalars())


def owners(s: Session, keys: Sequence[str]) -> dict[str, Owner]:
    """The owner of each of ``keys`` that has a flight row, share-locked (see the module)."""
    if not keys:
        return {}
    found = {
        r.cache_key: Owner(r.cache_key, r.step_run_id, r.run_id, r.status)
        for r in s.connection().execute(_OWNERS, {"keys": sorted(keys)})
    }
    gone = [k for k in keys if k not in found]
    if gone:
        for r in s.connection().execute(_NAMED, {"keys": gone}):
            found[r.cache_key] = Owner(r.cache_key, r.step_run_id, r.run_id, None)
    return found


def seize(
    s: Session, cache_key: str, old_owner: str, *, step_run_id: str, run_id: str, now: float
) -> bool:
    """Make ``step_run_id`` the owner of ``cache_key`` in place of ``old_owner``; False when
    another transaction replaced that owner first."""
    res = s.connection().execute(
        _SEIZE,
        {
            "f_key": cache_key,
            "f_old": old_owner,
            "f_new": step_run_id,
            "f_run": run_id,
            "f_now": now,
        },
    )
    return res.rowcount == 1


def land(s: Session, owner: str, owner_run_id: str, *, now: float) -> list[Row[Any]]:
    """Settle the steps waiting for ``owner`` (which just committed) as cached from it; returns
    their (id, run_id, invocation_id). One indexed statement, also when nobody waits."""
    return list(
        s.connection().execute(
            _LAND, {"l_owner": owner, "l_run": owner_run_id, "l_step": owner, "l_now": now}
        )
    )


def waiters(s: Session, owners: Sequence[str]) -> list[Row[Any]]:
    """Steps waiting for any of ``owners`` (id, run_id, waits_for, cache_key), locked, by owner."""
    if not owners:
        return []
    return list(s.connection().execute(_WAITERS, {"owners": sorted(set(owners))}))


def take_flight(s: Session, step_run_id: str) -> bool:
    """A waiting step computes after all (its owner ended without outputs): ``ready``."""
    res = s.execute(
        update(STEPS)
        .where(STEPS.c.id == step_run_id, STEPS.c.status.in_(sources(Move.TAKE_FLIGHT)))
        .values(status=target(Move.TAKE_FLIGHT), waits_for=None)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def wait_for(s: Session, step_run_ids: Sequence[str], owner: str) -> None:
    """Point waiting steps at another owner."""
    if step_run_ids:
        s.execute(
            update(STEPS)
            .where(STEPS.c.id.in_(list(step_run_ids)), STEPS.c.status == StepStatus.WAITING.value)
            .values(waits_for=owner)
        )


def orphans(s: Session) -> list[Row[Any]]:
    """Waiting steps whose owner is finished or gone: (id, waits_for, owner_status,
    owner_run_id, owner_invocation_id). Reads only waiting rows (by the status index)."""
    return list(s.connection().execute(_ORPHANS))
