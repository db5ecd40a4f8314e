"""One chaos run (:func:`run_chaos`): start the cluster, the clients and the killer, then
check every run's commits and bodies and build the ``chaos.*`` results."""

from __future__ import annotations

import contextlib
import random
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.chaos.client import WAIT_AFTER_S, start_clients
from bench.chaos.killer import Killer
from bench.chaos.report import RunRecord, chaos_results, parse_client_output, plan_faults, summarise
from bench.report import Result, progress

if TYPE_CHECKING:
    from tests.faults.harness import FaultCluster

__all__ = ["run_chaos"]


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
    killer: Killer,
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
    killer = Killer(cluster, rng)
    try:
        cluster.start_scheduler()
        for slot in killer.slots:
            killer.start_worker(slot, slot.base)
        t0 = time.time()
        deadline = t0 + duration_s
        clients = start_clients(cluster, root, deadline, seed)
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
