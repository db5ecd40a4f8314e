"""The chaos bench's pure parts: the fault kinds and plan, the records of faults and runs,
the clients' output, the summary (:func:`summarise`) and the results (:func:`chaos_results`).

They are pure functions of the records, unit-tested in ``tests/unit/test_chaos_report.py``.
"""

from __future__ import annotations

import ast
import collections
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.report import Result

__all__ = [
    "FAULT_GAP_S",
    "PARTITION",
    "PARTITION_S",
    "POOL_KILL",
    "POSTGRES_RESTART",
    "REDIS_RESTART",
    "RERUN_CAUSES",
    "TARGET",
    "TERMINAL",
    "WORKER_KILL",
    "ChaosSummary",
    "Fault",
    "RunRecord",
    "chaos_results",
    "duplicate_outputs",
    "parse_client_output",
    "plan_faults",
    "summarise",
]

WORKER_KILL = "worker_kill"
POOL_KILL = "pool_kill"
REDIS_RESTART = "redis_restart"
POSTGRES_RESTART = "postgres_restart"
PARTITION = "partition"
#: Faults that may make a step body run again: its process died or was cut off.
RERUN_CAUSES = frozenset({WORKER_KILL, POOL_KILL, PARTITION})
#: Seconds between two faults (uniform).
FAULT_GAP_S = (10.0, 20.0)
PARTITION_S = 30.0
TARGET = "0 lost, 0 committed twice, every run completed"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
_ROWS_RE = re.compile(r"^(?P<inv>[^:]+): (?:artifact rows|output edges) (?P<names>\[.*\])$")


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One fault struck. Times are epoch seconds; ``until`` is when it ended (None: at once)."""

    kind: str
    at: float
    until: float | None = None
    target: str = ""
    detail: str = ""

    def overlaps(self, start: float, end: float) -> bool:
        """Whether the fault (from ``at`` to ``until``) touches ``[start, end]``."""
        return self.at <= end and (self.until or self.at) >= start


@dataclass(frozen=True)
class RunRecord:
    """One submitted run as its client saw it. ``status`` is ``running`` when it had not
    ended when the client stopped waiting, ``unknown`` when the client never reported it."""

    marker_dir: str
    pipeline: str
    run_id: str
    status: str
    submitted_at: float
    ended_at: float | None = None
    output: int | None = None
    expected: int | None = None
    error: str = ""


@dataclass(frozen=True)
class ChaosSummary:
    """The figures of one chaos run (see :func:`summarise`)."""

    submitted: int
    completed: int
    failed: int
    lost: int
    wrong_output: int
    submit_errors: int
    committed_twice: int
    other_commit_problems: int
    reruns: int
    unexplained_reruns: int
    worst_fault_to_completion_s: float | None
    worst: dict[str, Any] = field(default_factory=dict)
    #: Per fault kind, the longest fault-to-completion time (s).
    worst_by_kind: dict[str, float] = field(default_factory=dict)
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    lost_runs: tuple[str, ...] = ()
    failed_runs: tuple[str, ...] = ()
    duplicates: tuple[str, ...] = ()
    unexplained: tuple[str, ...] = ()

    def line(self) -> str:
        """One line for logs and the ``summary`` of every result."""
        worst = self.worst_fault_to_completion_s
        return (
            f"{self.submitted} submitted, {self.completed} completed, {self.failed} failed, "
            f"{self.lost} lost, {self.wrong_output} wrong output, {self.committed_twice} "
            f"committed twice, {self.unexplained_reruns}/{self.reruns} re-runs unexplained, "
            f"worst fault->completion {'-' if worst is None else f'{worst:.1f} s'}"
        )


# -- pure parts ------------------------------------------------------------------------------


def plan_faults(
    rng: random.Random,
    duration_s: float,
    *,
    gap_s: tuple[float, float] = FAULT_GAP_S,
    partition_s: float = PARTITION_S,
) -> list[tuple[float, str]]:
    """Offsets (seconds from the start) and kinds of the faults of a run of ``duration_s``.

    One every ``gap_s`` seconds, each a worker or pool kill, except that one is a Redis
    restart, one a PostgreSQL restart and one a partition whose heal (``partition_s``
    later) still falls within the run; a run too short for them leaves them out.
    """
    times: list[float] = []
    t = rng.uniform(*gap_s)
    while t < duration_s:
        times.append(round(t, 3))
        t += rng.uniform(*gap_s)
    kinds = [rng.choice((WORKER_KILL, POOL_KILL)) for _ in times]
    free = list(range(len(times)))
    rng.shuffle(free)
    for kind in (PARTITION, REDIS_RESTART, POSTGRES_RESTART):
        fits = [i for i in free if kind != PARTITION or times[i] + partition_s <= duration_s]
        if fits:
            kinds[fits[0]] = kind
            free.remove(fits[0])
    return list(zip(times, kinds, strict=True))


def parse_client_output(text: str) -> tuple[list[RunRecord], list[dict[str, Any]]]:
    """The runs a client printed (``SUBMIT``, then ``RUN`` once over) and its failed submits.

    A run with a ``SUBMIT`` line and no ``RUN`` line has status ``unknown``.
    """
    runs: dict[str, RunRecord] = {}
    errors: list[dict[str, Any]] = []
    for line in text.splitlines():
        tag, _, payload = line.partition(" ")
        if tag not in ("SUBMIT", "RUN", "SUBMIT_ERROR"):
            continue
        data = json.loads(payload)
        if tag == "SUBMIT_ERROR":
            errors.append(data)
            continue
        record = RunRecord(
            marker_dir=data["marker_dir"],
            pipeline=data["pipeline"],
            run_id=data["run_id"],
            status=data.get("status", "unknown") if tag == "RUN" else "unknown",
            submitted_at=float(data["submitted_at"]),
            ended_at=data.get("ended_at"),
            output=data.get("output"),
            expected=data.get("expected"),
            error=data.get("error", ""),
        )
        if tag == "RUN" or record.run_id not in runs:
            runs[record.run_id] = record
    return list(runs.values()), errors


def duplicate_outputs(problem: str) -> list[str]:
    """Output names that a :func:`~tests.faults.harness.commit_problems` line lists more than
    once (an output committed twice); empty for any other problem."""
    m = _ROWS_RE.match(problem)
    if m is None:
        return []
    try:
        names = ast.literal_eval(m["names"])
    except (ValueError, SyntaxError):
        return []
    counts = collections.Counter(str(n) for n in names)
    return sorted(n for n, c in counts.items() if c > 1)


def summarise(
    runs: Sequence[RunRecord],
    faults: Sequence[Fault],
    *,
    bodies: Mapping[str, Mapping[str, int]],
    problems: Mapping[str, Sequence[str]],
    horizon: float,
    submit_errors: int = 0,
) -> ChaosSummary:
    """Count what went wrong.

    Args:
        runs: every submitted run.
        faults: every fault struck.
        bodies: per run id, how often each step body started (``bodies.log``).
        problems: per completed run id, its :func:`~tests.faults.harness.commit_problems`.
        horizon: when the waiting ended (epoch s): the end of a lost run's lifetime.
        submit_errors: submits that raised before recording a run.

    A body that ran more than once is explained when a worker kill, pool kill or partition
    overlapped its run's lifetime. The fault-to-completion time is taken over every fault
    and every run completed after it that was submitted before it.
    """
    completed = [r for r in runs if r.status == "completed"]
    failed = [r for r in runs if r.status in ("failed", "cancelled")]
    lost = [r for r in runs if r.status not in TERMINAL]
    wrong = [r for r in completed if r.expected is not None and r.output != r.expected]
    duplicates: list[str] = []
    other = 0
    for run_id, found in problems.items():
        for p in found:
            names = duplicate_outputs(p)
            if names:
                inv = p.partition(":")[0]
                duplicates.extend(f"{run_id} {inv}.{n}" for n in names)
            else:
                other += 1
    reruns = 0
    unexplained: list[str] = []
    for r in runs:
        again = {b: n for b, n in bodies.get(r.run_id, {}).items() if n > 1}
        reruns += len(again)
        end = r.ended_at if r.ended_at is not None else horizon
        if again and not any(
            f.kind in RERUN_CAUSES and f.overlaps(r.submitted_at, end) for f in faults
        ):
            unexplained.extend(f"{r.run_id} {b} x{n}" for b, n in sorted(again.items()))
    worst: dict[str, Any] = {}
    by_kind: dict[str, float] = {}
    for f in faults:
        for r in completed:
            if r.ended_at is None or not r.submitted_at <= f.at < r.ended_at:
                continue
            took = round(r.ended_at - f.at, 2)
            by_kind[f.kind] = max(by_kind.get(f.kind, 0.0), took)
            if not worst or took > worst["seconds"]:
                worst = {"seconds": took, "fault": f.kind, "at": f.at, "run": r.run_id}
    return ChaosSummary(
        submitted=len(runs),
        completed=len(completed),
        failed=len(failed),
        lost=len(lost),
        wrong_output=len(wrong),
        submit_errors=submit_errors,
        committed_twice=len(set(duplicates)),
        other_commit_problems=other,
        reruns=reruns,
        unexplained_reruns=len(unexplained),
        worst_fault_to_completion_s=worst.get("seconds"),
        worst=worst,
        worst_by_kind=by_kind,
        faults_by_kind=dict(collections.Counter(f.kind for f in faults)),
        lost_runs=tuple(r.run_id for r in lost),
        failed_runs=tuple(f"{r.run_id} {r.error}".strip() for r in failed),
        duplicates=tuple(sorted(set(duplicates))),
        unexplained=tuple(unexplained),
    )


def chaos_results(
    summary: ChaosSummary,
    faults: Sequence[Fault],
    runs: Sequence[RunRecord],
    *,
    bodies: Mapping[str, Mapping[str, int]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[Result]:
    """The ``chaos.*`` results; the first carries the faults and the per-run records."""
    t0 = min([*(r.submitted_at for r in runs), *(f.at for f in faults)], default=0.0)
    line = summary.line()
    details = {
        "summary": line,
        **dict(extra or {}),
        "faults": [{**asdict(f), "t_s": round(f.at - t0, 1)} for f in faults],
        "faults_by_kind": summary.faults_by_kind,
        "runs": [
            {
                "run": r.run_id[:8],
                "pipeline": r.pipeline,
                "status": r.status,
                "t_s": round(r.submitted_at - t0, 1),
                "took_s": None if r.ended_at is None else round(r.ended_at - r.submitted_at, 1),
                "reran": {b: n for b, n in (bodies or {}).get(r.run_id, {}).items() if n > 1},
            }
            for r in runs
        ],
    }

    def result(name: str, what: str, unit: str, value: float, **raw: Any) -> Result:
        return Result(
            name=f"chaos.{name}",
            description=what,
            unit=unit,
            value=value,
            target=TARGET,
            raw={"summary": line, **raw},
        )

    worst = summary.worst_fault_to_completion_s
    return [
        Result(
            name="chaos.runs_submitted",
            description="runs submitted by 2 clients while faults struck every 10-20 s",
            unit="runs",
            value=summary.submitted,
            target=TARGET,
            raw={**details, "submit_errors": summary.submit_errors},
        ),
        result("runs_completed", "runs that completed", "runs", summary.completed),
        result("runs_failed", "runs that failed", "runs", summary.failed, runs=summary.failed_runs),
        result(
            "runs_lost",
            "runs neither completed nor failed when the clients stopped waiting",
            "runs",
            summary.lost,
            runs=summary.lost_runs,
        ),
        result(
            "committed_twice",
            "outputs with more than one artifact row or output edge (commit_problems)",
            "outputs",
            summary.committed_twice,
            outputs=summary.duplicates,
            other_problems=summary.other_commit_problems,
            wrong_output=summary.wrong_output,
        ),
        result(
            "unexplained_reruns",
            "step bodies run more than once with no worker/pool kill or partition in the run's lifetime",
            "bodies",
            summary.unexplained_reruns,
            bodies=summary.unexplained,
            reruns=summary.reruns,
        ),
        result(
            "worst_fault_to_completion",
            "longest time from a fault to the end of a run that was in flight at it",
            "s",
            -1.0 if worst is None else worst,
            worst=summary.worst,
            by_kind=summary.worst_by_kind,
        ),
        result(
            "faults",
            "faults struck",
            "faults",
            len(faults),
            by_kind=summary.faults_by_kind,
        ),
    ]
