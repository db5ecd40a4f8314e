"""Statements on the hot path, built once at import and executed with bound parameters.

Building a SQLAlchemy statement costs about 100 µs in Python; executing a
prebuilt one costs about 20 µs. A step's claim and commit run about a dozen
statements, so this is the difference between ~1 ms and ~2.5 ms per step.
Bind-parameter names must not equal column names in ``UPDATE ... SET``.
"""

from __future__ import annotations

from typing import cast as type_cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    Table,
    and_,
    bindparam,
    cast,
    func,
    or_,
    select,
    update,
)

from stores.metadata.models import ArtifactRow, LineageRow, RunRow, StepRunRow
from stores.metadata.states import Move, RunStatus, StepStatus, sources, target

INPUT = "input"
OUTPUT = "output"

STEPS = type_cast(Table, StepRunRow.__table__)
LINEAGE = type_cast(Table, LineageRow.__table__)
ARTIFACTS = type_cast(Table, ArtifactRow.__table__)

RUNS = type_cast(Table, RunRow.__table__)


def status_guard(move: Move) -> ColumnElement[bool]:
    """``status = <source>`` (or ``IN (...)``) for ``move``, from the state table. A single
    source compiles to a plain comparison, which ``executemany`` accepts."""
    srcs = sources(move)
    if len(srcs) == 1:
        return STEPS.c.status == srcs[0]
    return STEPS.c.status.in_(srcs)


TERMINAL = [st.value for st in StepStatus if st.is_terminal()]
RUN_ALIVE = (
    select(RUNS.c.id)
    .where(RUNS.c.id == STEPS.c.run_id, RUNS.c.status == RunStatus.RUNNING.value)
    .exists()
)
#: What starting an attempt sets: the next attempt number, its lease and its worker.
_NEW_ATTEMPT = {
    "attempt": STEPS.c.attempt + 1,
    "started_at": bindparam("now"),
    "lease_expires_at": bindparam("lease"),
    "worker_host": bindparam("host"),
    "worker_pid": bindparam("pid"),
}
CLAIM = (
    update(STEPS)
    .where(STEPS.c.id == bindparam("_id"), status_guard(Move.CLAIM), RUN_ALIVE)
    .values(status=target(Move.CLAIM), **_NEW_ATTEMPT)
    .returning(*STEPS.c)
)
#: A new attempt replaces one whose worker is provably dead (guarded by the dead attempt).
TAKE_OVER = (
    update(STEPS)
    .where(
        STEPS.c.id == bindparam("_id"),
        status_guard(Move.TAKE_OVER),
        STEPS.c.attempt == bindparam("_attempt"),
        RUN_ALIVE,
    )
    .values(status=target(Move.TAKE_OVER), exception=bindparam("reason"), **_NEW_ATTEMPT)
    .returning(*STEPS.c)
)
DECREMENT = (
    update(STEPS)
    .where(
        STEPS.c.run_id == bindparam("b_run_id"),
        STEPS.c.invocation_id.in_(bindparam("b_invs", expanding=True)),
    )
    .values(deps_left=STEPS.c.deps_left - 1)
    .returning(STEPS.c.id, STEPS.c.invocation_id, STEPS.c.deps_left, STEPS.c.status)
)
IN_FLIGHT = select(func.count()).where(
    STEPS.c.run_id == bindparam("run_id"),
    STEPS.c.status.in_([StepStatus.QUEUED.value, StepStatus.RUNNING.value]),
)
#: Queue up to ``q_limit`` ready steps of a run, lowest position first, in one statement. The
#: task id is ``<step run id>.<next attempt>``: a resend of the same attempt reuses it, a retry
#: gets a new one.
_NEXT_READY = (
    select(STEPS.c.id)
    .where(STEPS.c.run_id == bindparam("q_run_id"), status_guard(Move.QUEUE))
    .order_by(STEPS.c.position)
    .limit(bindparam("q_limit", type_=Integer))
    .with_for_update(skip_locked=True)
    # A CTE, not "IN (subquery)": PostgreSQL may re-run such a subquery per row and so
    # ignore its LIMIT; a locking CTE is evaluated exactly once.
    .cte("next_ready")
)
QUEUE_READY = (
    update(STEPS)
    .where(STEPS.c.id.in_(select(_NEXT_READY.c.id)), status_guard(Move.QUEUE))
    .values(
        status=target(Move.QUEUE),
        queued_at=bindparam("q_now"),
        task_id=STEPS.c.id + "." + cast(STEPS.c.attempt + 1, String),
    )
    .returning(
        STEPS.c.id,
        STEPS.c.run_id,
        STEPS.c.invocation_id,
        STEPS.c.step_name,
        STEPS.c.queue,
        STEPS.c.task_id,
    )
)
UNFINISHED = select(func.count()).where(
    STEPS.c.run_id == bindparam("run_id"), STEPS.c.status.not_in(TERMINAL)
)
LOCK_RUN = select(RUNS.c.id).where(RUNS.c.id == bindparam("run_id")).with_for_update()
OUTPUTS = (
    select(STEPS.c.invocation_id.label("_inv"), LINEAGE.c.name.label("_out"), ARTIFACTS)
    .select_from(
        STEPS.join(
            LINEAGE, and_(LINEAGE.c.step_run_id == STEPS.c.id, LINEAGE.c.direction == OUTPUT)
        ).join(ARTIFACTS, ARTIFACTS.c.id == LINEAGE.c.artifact_id)
    )
    .where(
        STEPS.c.run_id == bindparam("run_id"),
        STEPS.c.invocation_id.in_(bindparam("invs", expanding=True)),
    )
)
_CORRUPT_LINEAGE = LINEAGE.alias("corrupt_lineage")
_CORRUPT_ARTIFACTS = ARTIFACTS.alias("corrupt_artifacts")
#: The step run has an output that a load found corrupt (``artifacts.corrupted_at`` set) or
#: whose object was found gone (``missing_at``, set by ``zw gc --check`` or a cache-hit check).
#: Aliased tables, so the subquery correlates to ``step_runs`` only, not to the outer join.
HAS_CORRUPT_OUTPUT = (
    select(_CORRUPT_LINEAGE.c.artifact_id)
    .select_from(
        _CORRUPT_LINEAGE.join(
            _CORRUPT_ARTIFACTS, _CORRUPT_ARTIFACTS.c.id == _CORRUPT_LINEAGE.c.artifact_id
        )
    )
    .where(
        _CORRUPT_LINEAGE.c.step_run_id == STEPS.c.id,
        _CORRUPT_LINEAGE.c.direction == OUTPUT,
        or_(
            _CORRUPT_ARTIFACTS.c.corrupted_at.is_not(None),
            _CORRUPT_ARTIFACTS.c.missing_at.is_not(None),
        ),
    )
    .exists()
)
#: Completed step runs per cache key with their outputs; a run with a corrupt or lost output,
#: or whose ``cache_expires_at`` (``cache_expires_after``, ``zw cache clear``) is not after
#: ``now``, is no hit at all (an older good one may be), so the step runs again.
CACHE_HITS = (
    select(
        STEPS.c.cache_key,
        STEPS.c.id,
        STEPS.c.run_id,
        STEPS.c.ended_at,
        LINEAGE.c.name,
        ARTIFACTS.c.id.label("artifact_id"),
        ARTIFACTS.c.content_hash,
        ARTIFACTS.c.uri,
        ARTIFACTS.c.materializer,
        ARTIFACTS.c.data_type,
    )
    .select_from(
        STEPS.outerjoin(
            LINEAGE, and_(LINEAGE.c.step_run_id == STEPS.c.id, LINEAGE.c.direction == OUTPUT)
        ).outerjoin(ARTIFACTS, ARTIFACTS.c.id == LINEAGE.c.artifact_id)
    )
    .where(
        STEPS.c.cache_key.in_(bindparam("keys", expanding=True)),
        STEPS.c.status == StepStatus.COMPLETED.value,
        or_(STEPS.c.cache_expires_at.is_(None), STEPS.c.cache_expires_at > bindparam("now")),
        ~HAS_CORRUPT_OUTPUT,
    )
)
#: Settle a just-unblocked step: ``ready``, ``cached`` with its origin, or ``waiting`` for the
#: step run computing its cache key (all leave ``pending``).
SET_STEP = (
    update(STEPS)
    .where(
        STEPS.c.id == bindparam("_id"),
        # Both settle moves start from the same status (tests/unit/test_states.py checks).
        status_guard(Move.SETTLE_READY),
    )
    .values(
        status=bindparam("status"),
        cache_key=bindparam("cache_key"),
        cache_ingredients=bindparam("cache_ingredients"),
        cached_from_run_id=bindparam("cached_from_run_id"),
        cached_from_step_run_id=bindparam("cached_from_step_run_id"),
        waits_for=bindparam("waits_for"),
        started_at=bindparam("started_at"),
        ended_at=bindparam("ended_at"),
    )
)

COMPLETE = (
    update(STEPS)
    .where(
        STEPS.c.id == bindparam("_id"),
        status_guard(Move.COMPLETE),
        STEPS.c.attempt == bindparam("_attempt"),
    )
    .values(
        status=target(Move.COMPLETE),
        lease_expires_at=None,
        ended_at=bindparam("ended_at"),
        logs=bindparam("logs"),
        step_metadata=bindparam("step_metadata"),
        cache_expires_at=bindparam("expires_at"),
        exception="",
        traceback="",
    )
    # The run's status comes back with the row, saving a query on every step commit.
    .returning(
        select(RUNS.c.status)
        .where(RUNS.c.id == STEPS.c.run_id)
        .scalar_subquery()
        .label("run_status")
    )
)
