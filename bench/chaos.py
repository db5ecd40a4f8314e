"""Chaos bench: a bounded storm of runs on one cluster while workers, pool processes,
Redis, PostgreSQL and a network link fail at random.

One :class:`~tests.faults.harness.FaultCluster` with the shipped default timing runs two
prefork workers (one "on another VM", in the network namespace), one solo worker and the
scheduler. Two client processes (``python -m bench.chaos CLIENT_ARGS``) submit ``diamond``
and ``fan`` runs of :mod:`tests.pipelines.faults` until the deadline, then wait for them and
print one JSON line per run. Meanwhile this process strikes a fault every 10-20 s: SIGKILL a
worker's whole tree (then start a replacement) or one prefork pool child, and once each
restart Redis, restart PostgreSQL and cut the namespace worker off for 30 s.

The summary (:func:`summarise`) and the results (:func:`chaos_results`) are pure functions
of the records, unit-tested in ``tests/unit/test_chaos_report.py``.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import Result, progress

if TYPE_CHECKING:
    from tests.faults.harness import FaultCluster
    from tests.services.process import ServiceProcess

__all__ = [
    "ChaosSummary",
    "Fault",
    "RunRecord",
    "chaos_results",
    "duplicate_outputs",
    "parse_client_output",
    "plan_faults",
    "run_chaos",
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
POSTGRES_DOWN_S = 3.0
CLIENTS = 2
#: Runs one client keeps in flight; it submits the next when one ends.
IN_FLIGHT_PER_CLIENT = 3
#: How long a client waits for its runs after the deadline before it calls them lost.
WAIT_AFTER_S = 240.0
TARGET = "0 lost, 0 committed twice, every run completed"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
_RECORDED_RE = re.compile(r"run ([0-9a-f-]{36}) is recorded")
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


# -- the killer ------------------------------------------------------------------------------


@dataclass
class _Slot:
    """A worker the killer may kill and replace."""

    base: str
    pool: str
    in_net: bool
    proc: ServiceProcess | None = None
    name: str = ""


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class _Killer:
    """Strikes faults on ``cluster`` and records them."""

    def __init__(self, cluster: FaultCluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.faults: list[Fault] = []
        #: Faults that could not be struck (``kind: error``); they are not in ``faults``.
        self.failures: list[str] = []
        self.slots = [
            _Slot("cpu@p1", "prefork", in_net=False),
            _Slot("cpu@p2", "prefork", in_net=True),
            _Slot("cpu@s1", "solo", in_net=False),
        ]
        self._replacements = 0
        self._lock = threading.Lock()  # the heal timer and the killer both record
        self._partition: int | None = None  # index in faults of the open partition
        self._timer: threading.Timer | None = None
        self._deadline = float("inf")

    @property
    def partitioned(self) -> bool:
        return self._partition is not None

    def start_worker(self, slot: _Slot, name: str) -> None:
        slot.name = name
        slot.proc = self.cluster.start_worker(
            name, concurrency=2, pool=slot.pool, in_net=slot.in_net
        )

    def run(self, plan: Sequence[tuple[float, str]], t0: float, deadline: float) -> None:
        """Strike the planned faults (offsets from ``t0``); returns by ``deadline`` (plus the
        time the last fault takes)."""
        self._deadline = deadline
        for offset, kind in plan:
            time.sleep(max(0.0, min(t0 + offset, deadline) - time.time()))
            if time.time() >= deadline:
                return
            self.strike(kind)

    def strike(self, kind: str) -> None:
        try:
            if kind == REDIS_RESTART:
                at = time.time()
                self.cluster.redis.restart()
                self._record(Fault(kind, at, time.time(), "redis"))
            elif kind == POSTGRES_RESTART:
                at = time.time()
                self.cluster.postgres.kill()
                time.sleep(POSTGRES_DOWN_S)
                self.cluster.postgres.start()
                self._record(Fault(kind, at, time.time(), "postgres"))
            elif kind == PARTITION:
                self._cut()
            elif kind == POOL_KILL and self._kill_pool_child():
                pass
            else:
                self._kill_worker()
        except Exception as e:  # a fault that could not be struck is reported, not fatal
            progress(f"chaos: {kind} failed: {type(e).__name__}: {e}")
            self.failures.append(f"{kind} at {time.time():.1f}: {type(e).__name__}: {e}")
        self.revive()

    def _cut(self) -> None:
        """Partition the namespace; a timer heals it :data:`PARTITION_S` later (or at the
        deadline), so a slow worker start in the meantime does not lengthen it."""
        assert self.cluster.net is not None
        self.cluster.net.partition()
        with self._lock:
            self._partition = len(self.faults)
        self._record(Fault(PARTITION, time.time(), None, self.slots[1].name))
        delay_s = max(0.0, min(PARTITION_S, self._deadline - time.time()))
        self._timer = threading.Timer(delay_s, self.heal)
        self._timer.daemon = True
        self._timer.start()

    def heal(self) -> None:
        """End the open partition, if any."""
        with self._lock:
            if self._partition is None:
                return
            assert self.cluster.net is not None
            self.cluster.net.heal()
            self.faults[self._partition] = replace(self.faults[self._partition], until=time.time())
            self._partition = None
        progress("chaos: partition healed")

    def end_partition(self) -> None:
        """Stop the heal timer and heal now: nothing else (the cluster is being stopped)."""
        if self._timer is not None:
            self._timer.cancel()
        self.heal()

    def settle(self) -> None:
        """Heal an open partition, start every stopped service and worker."""
        self.end_partition()
        self.cluster.ensure_services()
        self.revive()

    def revive(self) -> None:
        """Start a replacement for every worker that is not running (a failed start)."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.is_running():
                continue
            if slot.in_net and self.partitioned:
                continue  # it could not reach the broker to say it is ready
            try:
                self.start_worker(slot, slot.name or slot.base)
            except Exception as e:
                progress(f"chaos: could not start {slot.name}: {type(e).__name__}: {e}")

    def _kill_worker(self) -> None:
        slots = [
            s
            for s in self.slots
            if s.proc is not None and s.proc.is_running() and not (s.in_net and self.partitioned)
        ]
        slot = self.rng.choice(slots)
        assert slot.proc is not None
        at, pid, old = time.time(), slot.proc.pid, slot.name
        slot.proc.kill()
        self._replacements += 1
        same = self._replacements % 2 == 1
        name = slot.base if same else f"{slot.base}-r{self._replacements}"
        try:
            self.start_worker(slot, name)
            detail = f"pid {pid}; replaced by {name}"
        except Exception as e:
            slot.name = name
            detail = f"pid {pid}; replacement {name} failed: {type(e).__name__}: {e}"
        self._record(Fault(WORKER_KILL, at, target=old, detail=detail))

    def _kill_pool_child(self) -> bool:
        from tests.services.process import descendants

        choices = [
            (s, c)
            for s in self.slots
            if s.pool == "prefork" and s.proc is not None and s.proc.is_running()
            for c in descendants(s.proc.pid)
            if _parent_of(c) == s.proc.pid
        ]
        if not choices:
            return False
        slot, child = self.rng.choice(choices)
        at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        self._record(Fault(POOL_KILL, at, target=slot.name, detail=f"pid {child}"))
        return True

    def _record(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)
        progress(f"chaos: {fault.kind} {fault.target} {fault.detail}".rstrip())


# -- the clients -----------------------------------------------------------------------------


def _client_main(argv: Sequence[str]) -> int:
    """``python -m bench.chaos ROOT DEADLINE SEED WAIT_S``: submit runs until ``DEADLINE``
    (epoch s), keeping :data:`IN_FLIGHT_PER_CLIENT` in flight, then wait up to ``WAIT_S``."""
    from tests.pipelines import faults as pl
    from zenml_workers import Client, RunHandle, load_settings, submit
    from zenml_workers.sdk.stack import get_stack

    root, deadline, seed, wait_s = Path(argv[0]), float(argv[1]), int(argv[2]), float(argv[3])
    settings = load_settings()
    stack, client = get_stack(settings), Client(settings)
    rng = random.Random(seed)
    pending: dict[str, dict[str, Any]] = {}

    def emit(tag: str, record: Mapping[str, Any]) -> None:
        print(tag, json.dumps(record), flush=True)

    def submit_one(n: int) -> None:
        kind = rng.choice(("diamond", "fan"))
        d = root / f"run{n:04d}"
        d.mkdir(parents=True)
        (d / "release-h").touch()
        value = seed * 10_000 + n
        expected = pl.diamond_total(value) if kind == "diamond" else pl.fan_total(value)
        record = {"marker_dir": str(d), "pipeline": kind, "expected": expected}
        record["submitted_at"] = time.time()
        try:
            run_id = submit(getattr(pl, kind), settings=settings, marker_dir=str(d), seed=value).id
        except Exception as e:  # an outage at submit: the run may still be recorded
            m = _RECORDED_RE.search(str(e))
            if m is None:
                emit("SUBMIT_ERROR", {**record, "error": f"{type(e).__name__}: {e}"[:300]})
                return
            run_id = m[1]
        pending[run_id] = {**record, "run_id": run_id}
        emit("SUBMIT", pending[run_id])

    def retire() -> None:
        for run_id in list(pending):
            try:
                if RunHandle(run_id, stack).status == "running":
                    continue
                run = client.get_run(run_id)
            except Exception:  # PostgreSQL restarting: ask again later
                continue
            record = pending.pop(run_id)
            errors = [
                f"{s.invocation_id}: {s.exception}" for s in run.steps.values() if s.exception
            ]
            output = None
            if run.status == "completed":
                try:
                    output = run.steps["join"].output.load()
                except Exception as e:
                    errors.append(f"output: {type(e).__name__}: {e}")
            emit(
                "RUN",
                {
                    **record,
                    "status": run.status,
                    "ended_at": run.ended_at,
                    "output": output,
                    "error": "; ".join(errors)[:500],
                },
            )

    n = 0
    while time.time() < deadline:
        retire()
        if len(pending) < IN_FLIGHT_PER_CLIENT:
            submit_one(n)
            n += 1
        time.sleep(rng.uniform(0.2, 1.0))
    stop = time.time() + wait_s
    while pending and time.time() < stop:
        retire()
        time.sleep(0.5)
    for record in pending.values():
        emit("RUN", {**record, "status": "running"})
    return 0


def _start_clients(
    cluster: FaultCluster, root: Path, deadline: float, seed: int
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    from tests.services.process import REPO_ROOT, service_env

    out = []
    for c in range(CLIENTS):
        path = root / f"client{c}.out"
        with path.open("wb") as stdout, (root / f"client{c}.err").open("wb") as stderr:
            argv = [str(root / f"client{c}"), str(deadline), str(seed % 1000 * 10 + c)]
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.chaos", *argv, str(WAIT_AFTER_S)],
                env=service_env(cluster.env, drop_prefixes=("ZW_",)),
                cwd=REPO_ROOT,
                stdout=stdout,
                stderr=stderr,
            )
        out.append((proc, path))
    return out


def _step_states(metadata: Any, run_id: str) -> list[str]:
    """``invocation status attempt host`` of each step of a run, for the report."""
    from sqlalchemy import select

    from stores.metadata.models import StepRunRow

    with metadata.read() as s:
        rows = s.execute(select(StepRunRow).where(StepRunRow.run_id == run_id)).scalars()
        return [f"{r.invocation_id} {r.status} a{r.attempt} {r.worker_host}" for r in rows]


def _fill_unreported(metadata: Any, run: RunRecord) -> RunRecord:
    """A run its client never reported (it was killed) as the metadata store has it now."""
    if run.status != "unknown":
        return run
    from stores.metadata.models import RunRow

    with metadata.read() as s:
        row = s.get(RunRow, run.run_id)
        if row is None:
            return replace(run, error="not reported by its client; not in the metadata store")
        return replace(
            run,
            status=row.status,
            ended_at=row.ended_at,
            expected=None,
            error="not reported by its client (output unchecked)",
        )


# -- the bench -------------------------------------------------------------------------------


def _report(
    cluster: FaultCluster,
    killer: _Killer,
    clients: Sequence[tuple[subprocess.Popen[bytes], Path]],
    *,
    seed: int,
    duration_s: float,
    root: Path,
) -> list[Result]:
    """Read the clients' output, check every run's commits and bodies, build the results."""
    from tests.faults.harness import body_runs, commit_problems

    horizon = time.time()
    runs: list[RunRecord] = []
    submit_errors: list[dict[str, Any]] = []
    for _, path in clients:
        found, errors = parse_client_output(path.read_text())
        runs += found
        submit_errors += errors
    runs = [_fill_unreported(cluster.metadata, r) for r in runs]
    progress(f"chaos: {len(runs)} runs reported; checking commits and bodies")
    bodies = {r.run_id: dict(body_runs(Path(r.marker_dir))) for r in runs}
    problems: dict[str, list[str]] = {}
    for r in runs:
        if r.status == "completed":
            try:
                problems[r.run_id] = commit_problems(cluster.metadata, r.run_id)
            except Exception as e:
                problems[r.run_id] = [f"check failed: {type(e).__name__}: {e}"]
    summary = summarise(
        runs,
        killer.faults,
        bodies=bodies,
        problems={k: v for k, v in problems.items() if v},
        horizon=horizon,
        submit_errors=len(submit_errors),
    )
    progress(f"chaos: {summary.line()}")
    evidence = {
        r.run_id: _step_states(cluster.metadata, r.run_id) for r in runs if r.status != "completed"
    }
    extra = {
        "seed": seed,
        "duration_s": duration_s,
        "root": str(root),
        "submit_errors": submit_errors[:20],
        "faults_not_struck": killer.failures,
        "commit_problems": {k: v for k, v in problems.items() if v},
        "not_completed_steps": evidence,
    }
    return chaos_results(summary, killer.faults, runs, bodies=bodies, extra=extra)


def run_chaos(workdir: Path, duration_s: float = 300.0, seed: int | None = None) -> list[Result]:
    """Run the chaos bench for ``duration_s`` seconds of faults (plus start-up and waiting).

    Args:
        workdir: a fresh ``chaos-*`` folder in it gets the cluster (services' data, every
            log), the clients' output and the runs' marker folders; it is kept.
        duration_s: how long clients submit and faults strike, in seconds.
        seed: seeds the fault plan and the clients (default: random, reported in ``raw``).

    Raises:
        ServiceUnavailableError: Redis, PostgreSQL, SeaweedFS or network namespaces are not
            available here.
    """
    from tests.faults.harness import start_fault_cluster

    seed = random.SystemRandom().randrange(1_000_000) if seed is None else seed
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="chaos-", dir=workdir))  # runs never share a folder
    progress(f"chaos: seed {seed}, {duration_s:g} s of faults; logs under {root}")
    cluster = start_fault_cluster(root / "cluster", timing={}, with_net=True)
    clients: list[tuple[subprocess.Popen[bytes], Path]] = []
    killer = _Killer(cluster, rng)
    try:
        cluster.start_scheduler()
        for slot in killer.slots:
            killer.start_worker(slot, slot.base)
        t0 = time.time()
        deadline = t0 + duration_s
        clients = _start_clients(cluster, root, deadline, seed)
        killer.run(plan_faults(rng, duration_s), t0, deadline)
        killer.settle()
        progress("chaos: faults over, every service and worker up; waiting for the clients")
        until = time.time() + max(0.0, deadline - time.time()) + WAIT_AFTER_S + 60.0
        for proc, _ in clients:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1.0, until - time.time()))
        return _report(cluster, killer, clients, seed=seed, duration_s=duration_s, root=root)
    finally:
        for proc, _ in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):
            killer.end_partition()
        cluster.stop()


if __name__ == "__main__":
    raise SystemExit(_client_main(sys.argv[1:]))
