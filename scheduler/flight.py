"""Single-flight caching: a step whose cache key is being computed elsewhere waits for it.

When a step's cache key is decided with no cache hit, it *boards* the key's flight
(``cache_flights``, see :mod:`stores.metadata.flights`):

- the first step to board owns the flight and computes, as without single-flight;
- a later one, in any run of any user, becomes ``waiting`` (``waits_for`` the owner): it is
  not sent to the broker, holds no lease and uses no attempt;
- the owner's commit settles every waiter as cached from it in the same transaction
  (:func:`stores.metadata.flights.land`), and the waiters' runs move on as after a cache hit;
- an owner that ends without outputs (failed for good, skipped, cancelled) hands the flight
  to one of its waiters (:func:`hand_over`), which becomes ``ready`` and computes; the others
  wait for it. A lease expiry keeps the owner: its next attempt computes.

Everything here runs inside the caller's transaction and takes ``now`` as a parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from stores.metadata import flights as fl
from stores.metadata.states import StepStatus

log = logging.getLogger("zenml_workers.scheduler")

#: Boarding attempts per key before a step computes without a flight (owners replaced
#: concurrently again and again; computing twice is still correct, only wasted).
_ROUNDS = 3


@dataclass(frozen=True)
class Wanted:
    """A step run whose cache key has no usable hit and that wants to compute it."""

    cache_key: str
    step_run_id: str
    run_id: str


@dataclass(frozen=True)
class Boarded:
    """What boarding decided for one step run: wait for ``waits_for``, take ``hit`` (the owner
    committed in the meantime), or compute (both None)."""

    waits_for: str | None = None
    hit: Any = None


def board(
    s: Session,
    wanted: Sequence[Wanted],
    *,
    now: float,
    recheck: Callable[[Collection[str]], Mapping[str, Any]],
) -> dict[str, Boarded]:
    """Board the flights of ``wanted`` (one INSERT, and one locked SELECT when some key is
    taken); returns a decision per step run id.

    ``recheck(keys)`` returns the usable cache hits of ``keys`` now: it is called for keys
    whose owner committed after the caller's cache lookup. Steps of ``wanted`` sharing a key
    (one pipeline calling the same step on the same inputs twice) share one flight.
    """
    lead: dict[str, Wanted] = {}
    for w in wanted:
        lead.setdefault(w.cache_key, w)
    outcome: dict[str, Boarded] = {}  # by key
    todo = dict(lead)
    for _ in range(_ROUNDS):
        if not todo:
            break
        won = fl.insert(
            s,
            [
                {
                    "cache_key": k,
                    "step_run_id": w.step_run_id,
                    "run_id": w.run_id,
                    "started_at": now,
                }
                for k, w in todo.items()
            ],
        )
        outcome.update((k, Boarded()) for k in won)
        lost = [k for k in todo if k not in won]
        again: dict[str, Wanted] = {}
        landed: dict[str, fl.Owner] = {}
        for k, owner in fl.owners(s, lost).items():
            if owner.computing():
                outcome[k] = Boarded(waits_for=owner.step_run_id)
            elif owner.status in (StepStatus.COMPLETED.value, StepStatus.CACHED.value):
                landed[k] = owner
            elif _seize(s, todo[k], owner, now):
                outcome[k] = Boarded()
            else:
                again[k] = todo[k]
        # A key whose row vanished between the insert and the lookup: insert again.
        again.update((k, todo[k]) for k in lost if k not in outcome and k not in landed)
        if landed:
            hits = recheck(list(landed))
            for k, owner in landed.items():
                if k in hits:
                    outcome[k] = Boarded(hit=hits[k])
                elif _seize(s, todo[k], owner, now):  # its outputs are no hit any more
                    outcome[k] = Boarded()
                else:
                    again[k] = todo[k]
        todo = again
    for k, w in todo.items():
        log.warning(
            "run %s step run %s: computing %s without single-flight", w.run_id, w.step_run_id, k
        )
        outcome[k] = Boarded()
    out: dict[str, Boarded] = {}
    for w in wanted:
        first, decided = lead[w.cache_key], outcome[w.cache_key]
        if w is first or decided.waits_for is not None or decided.hit is not None:
            out[w.step_run_id] = decided
        else:
            out[w.step_run_id] = Boarded(waits_for=first.step_run_id)  # the lead computes
    return out


def _seize(s: Session, w: Wanted, owner: fl.Owner, now: float) -> bool:
    return fl.seize(
        s, w.cache_key, owner.step_run_id, step_run_id=w.step_run_id, run_id=w.run_id, now=now
    )


def hand_over(s: Session, ended: Sequence[str], *, now: float) -> set[str]:
    """Give the flights of step runs that ended without outputs to one of their waiters each
    (``ready``), and point the other waiters at it; returns the runs with a new owner, whose
    broker windows the caller fills. One indexed SELECT when nobody waits."""
    rows = fl.waiters(s, ended)
    by_owner: dict[str, list[Any]] = {}
    for r in rows:
        by_owner.setdefault(r.waits_for, []).append(r)
    runs: set[str] = set()
    for dead, waiting in by_owner.items():
        new, rest = waiting[0], waiting[1:]
        if not fl.seize(s, new.cache_key, dead, step_run_id=new.id, run_id=new.run_id, now=now):
            # Someone else owns the key now (a planner replaced the dead owner): compute
            # anyway rather than wait on a row this transaction did not check.
            log.info("step run %s takes over %s without its flight row", new.id, new.cache_key)
        if fl.take_flight(s, new.id):
            runs.add(new.run_id)
            log.info(
                "run %s step run %s takes over cache key %s from %s, which ended without outputs",
                new.run_id,
                new.id,
                new.cache_key,
                dead,
            )
        fl.wait_for(s, [r.id for r in rest], new.id)
    return runs
