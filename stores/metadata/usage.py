"""What steps cost: the record a worker stores with each step, and the sums over a period.

A step's cost lives under ``step_runs.step_metadata["usage"]`` (no schema change): the wall
time of its latest measured attempt's step call, the CPU time of that call, the GPUs the
attempt held and the GPU-seconds that follow (GPUs x wall time), plus the totals over every
measured attempt, failed ones included. A cache hit records nothing of its own: it is
credited with its original's cost as *saved*, attributed to the run that reused it.

Every number is rounded to microseconds when recorded and every sum again after summing,
so a sum of recorded numbers is the same whatever the order the database adds them in.
Sums run in SQL: SQLAlchemy's JSON paths compile to ``JSON_EXTRACT`` on SQLite and to
``#>>`` on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, case, distinct, func, select
from sqlalchemy.orm import Session

from stores.metadata.statements import RUNS, STEPS
from stores.metadata.states import StepStatus

#: The ``step_metadata`` key of a step's :class:`UsageRecord`.
USAGE_KEY = "usage"
#: What :func:`usage_by` may group by.
GROUPINGS = ("user", "pipeline", "run")
#: Recorded numbers and sums are rounded to this many decimals (microseconds).
DECIMALS = 6


def seconds(value: float) -> float:
    """``value`` rounded to microseconds, the precision every cost is kept at."""
    return round(value, DECIMALS)


@dataclass(frozen=True)
class UsageRecord:
    """The cost of a step's measured attempts, stored under ``step_metadata["usage"]``.

    Attributes:
        wall_s: wall time of the latest measured attempt's step call, in seconds.
        cpu_s: user + system CPU time of that call, in seconds.
        gpus: ids (from ``CUDA_VISIBLE_DEVICES``) of the GPUs that attempt held.
        gpu_s: ``len(gpus) * wall_s``.
        cpu_scope: ``process`` (the worker process and the children it waited for) or
            ``thread`` (only the step's thread: other steps ran in the same process).
        attempts: how many attempts were measured (an attempt whose process died is not).
        total_wall_s, total_cpu_s, total_gpu_s: the sums over every measured attempt.
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpus: tuple[str, ...] = ()
    gpu_s: float = 0.0
    cpu_scope: str = "process"
    attempts: int = 0
    total_wall_s: float = 0.0
    total_cpu_s: float = 0.0
    total_gpu_s: float = 0.0
    version: int = 1

    def then(
        self, *, wall_s: float, cpu_s: float, gpus: Sequence[str], cpu_scope: str = "process"
    ) -> UsageRecord:
        """This record with one more measured attempt, which becomes the latest."""
        wall, cpu = seconds(max(wall_s, 0.0)), seconds(max(cpu_s, 0.0))
        gpu = seconds(len(gpus) * wall)
        return UsageRecord(
            wall_s=wall,
            cpu_s=cpu,
            gpus=tuple(gpus),
            gpu_s=gpu,
            cpu_scope=cpu_scope,
            attempts=self.attempts + 1,
            total_wall_s=seconds(self.total_wall_s + wall),
            total_cpu_s=seconds(self.total_cpu_s + cpu),
            total_gpu_s=seconds(self.total_gpu_s + gpu),
        )

    def encode(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "gpus": list(self.gpus),
            "gpu_s": self.gpu_s,
            "cpu_scope": self.cpu_scope,
            "attempts": self.attempts,
            "total_wall_s": self.total_wall_s,
            "total_cpu_s": self.total_cpu_s,
            "total_gpu_s": self.total_gpu_s,
        }

    @classmethod
    def decode(cls, d: Mapping[str, Any] | None) -> UsageRecord | None:
        """The record in ``d`` (an encoded record), or None when there is none."""
        if not isinstance(d, Mapping):
            return None
        return cls(
            wall_s=float(d.get("wall_s", 0.0)),
            cpu_s=float(d.get("cpu_s", 0.0)),
            gpus=tuple(str(g) for g in d.get("gpus", ())),
            gpu_s=float(d.get("gpu_s", 0.0)),
            cpu_scope=str(d.get("cpu_scope", "process")),
            attempts=int(d.get("attempts", 0)),
            total_wall_s=float(d.get("total_wall_s", 0.0)),
            total_cpu_s=float(d.get("total_cpu_s", 0.0)),
            total_gpu_s=float(d.get("total_gpu_s", 0.0)),
            version=int(d.get("version", 1)),
        )

    @classmethod
    def of(cls, step_metadata: Mapping[str, Any] | None) -> UsageRecord | None:
        """The record in a step's ``step_metadata``, or None when it has none."""
        return cls.decode((step_metadata or {}).get(USAGE_KEY))


@dataclass(frozen=True)
class UsageTotals:
    """Sums over the step runs of one group (a user, a pipeline or a run), in seconds.

    ``steps`` counts the step runs that ran at least one attempt, ``cached_steps`` the
    cache hits; ``saved_*`` are the cache hits' originals' costs (their final attempt).
    """

    key: str
    runs: int
    steps: int
    cached_steps: int
    wall_s: float
    cpu_s: float
    gpu_s: float
    saved_wall_s: float
    saved_cpu_s: float
    saved_gpu_s: float
    pipeline: str | None = None
    user: str | None = None


def _number(table: Any, name: str) -> Any:
    # The missing record (a step run before costs were recorded, a pending one) counts as 0.
    return func.coalesce(table.c.step_metadata[(USAGE_KEY, name)].as_float(), 0.0)


def usage_by(s: Session, *, by: str, since: float) -> list[UsageTotals]:
    """Sums of step costs and cache savings per ``by`` (user, pipeline or run), biggest first.

    A step run counts in the period when it ended at or after ``since`` (epoch seconds), or,
    not ended yet, started then; a cache hit ended when it was settled.

    Raises:
        ValueError: ``by`` is not one of :data:`GROUPINGS`.
    """
    if by not in GROUPINGS:
        raise ValueError(f"usage cannot be grouped by {by!r}; use one of {', '.join(GROUPINGS)}")
    keys: list[Any] = {
        "user": [RUNS.c.user],
        "pipeline": [RUNS.c.pipeline_name],
        "run": [RUNS.c.id, RUNS.c.pipeline_name, RUNS.c.user],
    }[by]
    original = STEPS.alias("original")
    cached = STEPS.c.status == StepStatus.CACHED.value
    stmt = (
        select(
            *keys,
            func.count(distinct(RUNS.c.id)).label("runs"),
            func.sum(case((STEPS.c.attempt > 0, 1), else_=0)).label("steps"),
            func.sum(case((cached, 1), else_=0)).label("cached_steps"),
            *(
                func.sum(_number(STEPS, f"total_{n}")).cast(Float).label(n)
                for n in ("wall_s", "cpu_s", "gpu_s")
            ),
            *(
                func.sum(case((cached, _number(original, n)), else_=0.0))
                .cast(Float)
                .label(f"saved_{n}")
                for n in ("wall_s", "cpu_s", "gpu_s")
            ),
        )
        .select_from(
            STEPS.join(RUNS, RUNS.c.id == STEPS.c.run_id).outerjoin(
                original, original.c.id == STEPS.c.cached_from_step_run_id
            )
        )
        .where(func.coalesce(STEPS.c.ended_at, STEPS.c.started_at) >= since)
        .group_by(*keys)
    )
    rows = [
        UsageTotals(
            key=str(r[0]),
            runs=int(r.runs),
            steps=int(r.steps or 0),
            cached_steps=int(r.cached_steps or 0),
            wall_s=seconds(r.wall_s or 0.0),
            cpu_s=seconds(r.cpu_s or 0.0),
            gpu_s=seconds(r.gpu_s or 0.0),
            saved_wall_s=seconds(r.saved_wall_s or 0.0),
            saved_cpu_s=seconds(r.saved_cpu_s or 0.0),
            saved_gpu_s=seconds(r.saved_gpu_s or 0.0),
            pipeline=r.pipeline_name if by != "user" else None,
            user=r.user if by != "pipeline" else None,
        )
        for r in s.execute(stmt)
    ]
    return sorted(rows, key=lambda t: (-t.gpu_s, -t.cpu_s, t.key))


def records_of(s: Session, step_run_ids: Sequence[str]) -> dict[str, UsageRecord]:
    """The usage records of these step runs (those that have one), by step run id: what a
    cache hit's original cost."""
    if not step_run_ids:
        return {}
    rows = s.execute(
        select(STEPS.c.id, STEPS.c.step_metadata).where(STEPS.c.id.in_(list(step_run_ids)))
    )
    found = {row.id: UsageRecord.of(row.step_metadata) for row in rows}
    return {k: v for k, v in found.items() if v is not None}
