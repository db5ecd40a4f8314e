"""Where a cluster step's time goes: a 10-step chain on :mod:`bench.traced_worker`.

Not part of the default run (``--only profile``): the tracing itself costs a
little. For each hand-off from step ``k-1`` to step ``k`` of a chain it splits
the time, from the traces the worker processes wrote, into:

    commit_sql     outcomes.step_succeeded of k-1 (its statements, before COMMIT)
    commit         COMMIT of that transaction
    send           publishing step k's task
    publish        the run event on Redis pub/sub
    delivery       publish end of k-1 -> task body of k starts (ack, Redis, prefork hand-off)
    claim_begin    task start -> claim UPDATE starts (BEGIN, spec lookup)
    claim          the claim UPDATE
    body           claim end -> commit statements start (claim COMMIT, inputs, function, outputs)
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from bench.cluster import cluster
from bench.embedded import Seeds, run_timed
from bench.report import Result, median, progress

__all__ = ["PHASES", "bench_profile", "phases_of_run"]

PHASES = ("commit_sql", "commit", "send", "publish", "delivery", "claim_begin", "claim", "body")


def _load(trace_dir: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(run, step) -> {event: time} from every trace file; the claim is matched by process order."""
    events: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for path in trace_dir.glob("*.jsonl"):
        current: tuple[str, str] | None = None
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if "run" in e:
                current = (e["run"], e["step"])
            if current is not None:
                events[current].setdefault(e["event"], e["t"])
    return events


#: phase -> (event in step k-1 or k, start event, end event); "p" is the previous step, "c" the next.
_SPANS = {
    "commit_sql": ("p", "succeeded_start", "p", "succeeded_end"),
    "commit": ("p", "succeeded_end", "p", "execute_end"),
    "send": ("p", "send_start", "p", "send_end"),
    "publish": ("p", "send_end", "p", "publish_end"),
    "delivery": ("p", "publish_end", "c", "task_start"),
    "claim_begin": ("c", "task_start", "c", "claim_start"),
    "claim": ("c", "claim_start", "c", "claim_end"),
    "body": ("c", "claim_end", "c", "succeeded_start"),
}


def phases_of_run(
    events: dict[tuple[str, str], dict[str, float]], run_id: str, steps: list[str]
) -> list[dict[str, float]]:
    """Phase durations (seconds) of each hand-off ``steps[k-1] -> steps[k]`` of one chain run.

    A phase whose events are missing (a traced function was renamed in the project) is left out.
    """
    out = []
    for prev_name, name in zip(steps, steps[1:], strict=False):
        pair = {"p": events[(run_id, prev_name)], "c": events[(run_id, name)]}
        phases = {}
        for phase, (a, start, b, end) in _SPANS.items():
            if start in pair[a] and end in pair[b]:
                phases[phase] = pair[b][end] - pair[a][start]
        out.append(phases)
    return out


def bench_profile(
    workdir: Path, metadata_url: str, kind: str, rtt_s: float | None, repeats: int = 10
) -> Result:
    """Run ``repeats`` 10-step chains on the traced worker and report the median of each phase."""
    from bench.pipelines import CHAIN_LENGTH, chain

    trace_dir = workdir / "traces"
    seeds = Seeds(start=9_000)
    with cluster(
        workdir / "profile",
        metadata_url,
        kind,
        worker_app="bench.traced_worker",
        extra_env={"BENCH_TRACE_DIR": str(trace_dir)},
    ) as c:
        run_timed(chain, c.settings, seed=seeds())  # warm-up
        runs = []
        for _ in range(repeats):
            wall, run = run_timed(chain, c.settings, seed=seeds())
            order = sorted(run.steps.values(), key=lambda s: s.started_at or 0.0)
            runs.append((wall, run.id, [s.invocation_id for s in order]))
    events = _load(trace_dir)
    handoffs = [h for _, run_id, steps in runs for h in phases_of_run(events, run_id, steps)]
    medians = {
        name: median([h[name] for h in handoffs if name in h])
        for name in PHASES
        if any(name in h for h in handoffs)
    }
    total = sum(medians.values())
    wall = median([w for w, _, _ in runs])
    progress(
        "profile of a cluster step (median ms): "
        + ", ".join(f"{name} {value * 1000:.2f}" for name, value in medians.items())
        + f"; sum {total * 1000:.1f} ms, chain wall/10 {wall / CHAIN_LENGTH * 1000:.1f} ms"
    )
    return Result(
        name="profile.cluster_step",
        description=(
            "phases of one step-to-step hand-off on the cluster, from timestamps the traced worker writes "
            "(bench.traced_worker); value is the sum of the phase medians"
        ),
        unit="s",
        value=total,
        baseline=rtt_s,
        baseline_source="raw Celery round trip, this run" if rtt_s else "",
        ratio=total / rtt_s if rtt_s else None,
        ratio_meaning="ours / raw" if rtt_s else "",
        raw={"phase_medians_s": medians, "handoffs": handoffs, "chain_wall_median_s": wall},
    )
