"""The chaos bench's client processes: what one does (:func:`client_main`, run as
``python -m bench.chaos``) and how the bench starts them (:func:`start_clients`)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.faults.harness import FaultCluster

__all__ = ["CLIENTS", "IN_FLIGHT_PER_CLIENT", "WAIT_AFTER_S", "client_main", "start_clients"]

CLIENTS = 2
#: Runs one client keeps in flight; it submits the next when one ends.
IN_FLIGHT_PER_CLIENT = 3
#: How long a client waits for its runs after the deadline before it calls them lost.
WAIT_AFTER_S = 240.0
_RECORDED_RE = re.compile(r"run ([0-9a-f-]{36}) is recorded")


def client_main(argv: Sequence[str]) -> int:
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


def start_clients(
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
