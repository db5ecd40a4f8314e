"""Scheduler planning cost: ``scheduler.dispatch.plan_run`` inside one write transaction.

A wide pipeline of independent steps is built first (not timed); then the
transaction that records the run, its steps and its first window of queued
tasks is timed, commit included, as ``submit()`` runs it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench.report import Result, median, progress

__all__ = ["bench_planning", "time_plan"]


def time_plan(store: Any, width: int, seed: int, window: int = 64) -> float:
    """Seconds to plan a ``width``-step fan-out in one transaction on ``store`` (commit included)."""
    from bench.pipelines import fan_out
    from scheduler.dispatch import plan_run

    built = fan_out.build(seed=seed, width=width)
    blobs = [
        {"code_hash": b.code_hash, "name": b.name, "source": b.source, "pickled": b.pickled}
        for b in built.code.values()
    ]
    run_id = str(uuid.uuid4())
    started = time.perf_counter()
    with store.transaction() as s:
        queued = plan_run(
            s,
            spec=built.spec,
            code_blobs=blobs,
            run_id=run_id,
            run_name=f"bench-plan-{run_id}",
            config={},
            environment={},
            user="bench",
            orchestrator="celery",
            window=window,
            now=time.time(),
        )
    elapsed = time.perf_counter() - started
    if len(queued) != min(window, width):
        raise RuntimeError(f"plan_run queued {len(queued)} steps instead of {min(window, width)}")
    return elapsed


def bench_planning(
    url: str, kind: str, sizes: tuple[int, ...] = (1_000, 10_000), repeats: int = 3
) -> Result:
    """Benchmark 9: planning cost per step for each size on one metadata store."""
    from stores.metadata.store import MetadataStore

    store = MetadataStore(url)
    seed = 0
    try:
        time_plan(store, 10, seed=-1)  # engine, migration and statement caches warmed up
        per_size: dict[str, Any] = {}
        for width in sizes:
            samples = []
            for _ in range(repeats if width <= 1_000 else max(1, repeats - 1)):
                seed += 1
                samples.append(time_plan(store, width, seed=seed))
            per_size[str(width)] = {
                "samples_s": samples,
                "median_s": median(samples),
                "per_step_s": median(samples) / width,
            }
    finally:
        store.dispose()
    small, large = (per_size[str(w)] for w in (sizes[0], sizes[-1]))
    growth = large["per_step_s"] / small["per_step_s"]
    progress(
        f"plan_run on {kind}: "
        + ", ".join(
            f"{w} steps {per_size[str(w)]['median_s'] * 1000:.0f} ms "
            f"({per_size[str(w)]['per_step_s'] * 1e6:.0f} us/step)"
            for w in sizes
        )
        + f"; per-step cost x{growth:.2f} from {sizes[0]} to {sizes[-1]}"
    )
    return Result(
        name=f"planning.{kind}",
        description=(
            f"scheduler.dispatch.plan_run for fan-outs of {' and '.join(map(str, sizes))} independent steps "
            f"(window 64) in one transaction on {kind}, commit included; value is the per-step cost at "
            f"{sizes[-1]} steps, baseline the per-step cost at {sizes[0]} (ratio 1.0 = linear growth)"
        ),
        unit="s",
        value=large["per_step_s"],
        baseline=small["per_step_s"],
        baseline_source=f"per step at {sizes[0]} steps",
        ratio=growth,
        ratio_meaning=f"per-step cost {sizes[-1]} / {sizes[0]}",
        target="~1 (linear)",
        raw={"sizes": per_size},
    )
