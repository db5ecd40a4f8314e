"""Cluster benchmarks: Celery workers on Redis, compared with raw Celery on the same Redis.

Two Celery workers run side by side, each with 2 prefork processes: ours
(``celery -A zenml_workers.worker worker -Q cpu``) and a no-op app
(``bench.noop_app``), both with ``--without-mingle --without-gossip -E``. The raw
numbers are the floor any Celery-based design pays on this machine; ours are
reported as multiples of them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.embedded import Seeds, run_timed
from bench.report import Result, median, progress
from bench.services import start_celery_worker, start_redis
from tests.services.process import TEST_SECRET_KEY

__all__ = [
    "Cluster",
    "bench_cluster_chain",
    "bench_cluster_fanout",
    "bench_raw_roundtrip",
    "bench_raw_throughput",
    "cluster",
]

WORKER_CONCURRENCY = 2


@dataclass
class Cluster:
    """The running cluster: broker URL, our settings and a client for the raw no-op app."""

    broker_url: str
    metadata_url: str
    metadata_kind: str
    settings: Any
    noop_app: Any


@contextlib.contextmanager
def cluster(
    workdir: Path,
    metadata_url: str,
    metadata_kind: str,
    *,
    worker_app: str = "zenml_workers.worker",
    extra_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Start Redis, our worker and the no-op worker; stop every process on exit.

    Args:
        workdir: folder for logs, ``ZW_HOME`` and the shared local artifact folder.
        metadata_url: SQLAlchemy URL of the metadata store the workers share.
        metadata_kind: ``postgresql`` or ``sqlite``, for the report.
        worker_app: Celery app module of our worker (``bench.traced_worker`` to profile).
        extra_env: more environment for our worker.
    """
    from bench.noop_app import NOOP_QUEUE, make_app
    from zenml_workers.settings import load_settings

    stops: list[Callable[[], object]] = []  # what to stop on exit, in start order
    noop = None
    try:
        redis = start_redis(workdir / "redis")
        stops.append(redis.stop)
        broker_url = redis.url
        home, artifacts = workdir / "home", workdir / "artifacts"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "ZW_HOME": str(home),
            "ZW_BROKER_URL": broker_url,
            "ZW_METADATA_URL": metadata_url,
            "ZW_ARTIFACT_URI": str(artifacts),
            "ZW_QUEUES": "cpu,gpu",
            # Signed messages, as every cluster runs them: the bench measures their cost too.
            "ZW_SECRET_KEY": TEST_SECRET_KEY,
            **(extra_env or {}),
        }
        settings = load_settings(
            home=home,
            broker_url=broker_url,
            secret_key=TEST_SECRET_KEY,
            metadata_url=metadata_url,
            artifact_uri=str(artifacts),
            queues=["cpu", "gpu"],
        )
        # Migrate once here, so two workers do not both start by creating the schema.
        from stores.metadata.store import MetadataStore

        store = MetadataStore(metadata_url)
        store.migrate()
        store.dispose()
        started = time.perf_counter()
        stops.append(
            start_celery_worker(
                worker_app,
                ["cpu"],
                WORKER_CONCURRENCY,
                env,
                "bench-zw@localhost",
                broker_url,
                workdir,
            ).stop
        )
        stops.append(
            start_celery_worker(
                "bench.noop_app",
                [NOOP_QUEUE],
                WORKER_CONCURRENCY,
                {"BENCH_BROKER_URL": broker_url},
                "bench-noop@localhost",
                broker_url,
                workdir,
            ).stop
        )
        progress(
            f"cluster up: redis, {metadata_kind}, 2 workers x {WORKER_CONCURRENCY} processes "
            f"({time.perf_counter() - started:.1f} s for the workers)"
        )
        noop = make_app(broker_url)
        yield Cluster(broker_url, metadata_url, metadata_kind, settings, noop)
    finally:
        from zenml_workers.sdk.stack import close_stacks

        with contextlib.suppress(Exception):
            close_stacks()
        if noop is not None:
            noop.close()
        for stop in reversed(stops):
            stop()


def bench_raw_roundtrip(
    c: Cluster, calls: int = 200, name: str = "cluster.raw_roundtrip"
) -> Result:
    """Benchmark 6a: median ``apply_async().get()`` latency of the raw no-op task."""
    from bench.noop_app import NOOP_TASK

    task = c.noop_app.tasks[NOOP_TASK]
    for i in range(20):  # connections, pool processes and the result subscription warmed up
        task.apply_async((i,)).get(timeout=30)
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        task.apply_async((i,)).get(timeout=30)
        samples.append(time.perf_counter() - started)
    rtt = median(samples)
    ordered = sorted(samples)
    progress(f"raw celery no-op round trip: median {rtt * 1000:.2f} ms over {calls} calls")
    return Result(
        name=name,
        description=(
            f"raw Celery no-op task on the same Redis (broker and result backend), 2 prefork processes: "
            f"median apply_async().get() latency over {calls} sequential calls"
        ),
        unit="s",
        value=rtt,
        raw={
            "samples_s": samples,
            "p10_s": ordered[len(ordered) // 10],
            "p90_s": ordered[len(ordered) * 9 // 10],
        },
    )


def bench_raw_throughput(c: Cluster, tasks: int = 1000, repeats: int = 3) -> Result:
    """Benchmark 6b: wall time of sending ``tasks`` no-op tasks at once and waiting for all."""
    from celery.result import ResultSet

    from bench.noop_app import NOOP_TASK

    task = c.noop_app.tasks[NOOP_TASK]
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        results = ResultSet([task.apply_async((i,)) for i in range(tasks)])
        results.get(timeout=120)
        walls.append(time.perf_counter() - started)
    wall = median(walls)
    progress(f"raw celery {tasks} no-op tasks: median {wall:.2f} s ({tasks / wall:.0f} tasks/s)")
    return Result(
        name="cluster.raw_1000",
        description=f"raw Celery: send {tasks} no-op tasks, then wait for all results; median of {repeats}",
        unit="s",
        value=wall,
        raw={"samples_s": walls, "tasks": tasks, "tasks_per_s": tasks / wall},
    )


def _timeline(settings: Any, run_id: str) -> dict[str, float]:
    """Where a chain run's time went, from the step rows' timestamps (seconds).

    ``handoff`` is the gap from one step's commit starting to the next step's claim starting
    (commit transaction, send, broker delivery, task start); ``in_step`` is claim start to
    commit start (claim transaction, input load, the function, output write).
    """
    from sqlalchemy import select

    from stores.metadata.models import RunRow, StepRunRow
    from zenml_workers.sdk.stack import get_stack

    with get_stack(settings).metadata.read() as s:
        created = s.execute(select(RunRow.created_at).where(RunRow.id == run_id)).scalar_one()
        rows = s.execute(
            select(StepRunRow.started_at, StepRunRow.ended_at)
            .where(StepRunRow.run_id == run_id)
            .order_by(StepRunRow.position)
        ).all()
    handoffs = [rows[i].started_at - rows[i - 1].ended_at for i in range(1, len(rows))]
    in_step = [r.ended_at - r.started_at for r in rows]
    return {
        "first_claim_after_submit_s": rows[0].started_at - created,
        "handoff_median_s": median(handoffs),
        "in_step_median_s": median(in_step),
        "last_commit_start_after_submit_s": rows[-1].ended_at - created,
    }


def bench_cluster_chain(
    c: Cluster,
    seeds: Seeds,
    rtt_s: float,
    repeats: int = 10,
    name: str = "cluster.chain10_per_step",
) -> Result:
    """Benchmark 7: per-step overhead of a 10-step chain on the cluster, in raw round trips."""
    from bench.pipelines import CHAIN_LENGTH, chain

    warmup, _ = run_timed(chain, c.settings, seed=seeds(), timeout_s=60.0)
    samples, timelines = [], []
    for _ in range(repeats):
        wall, run = run_timed(chain, c.settings, seed=seeds(), timeout_s=60.0)
        samples.append(wall)
        timelines.append(_timeline(c.settings, run.id))
    wall = median(samples)
    per_step = wall / CHAIN_LENGTH
    breakdown = {k: median([t[k] for t in timelines]) for k in timelines[0]}
    progress(
        f"cluster 10-step chain ({c.metadata_kind}): median {wall * 1000:.0f} ms, {per_step * 1000:.1f} ms/step = "
        f"{per_step / rtt_s:.1f}x raw round trip (handoff {breakdown['handoff_median_s'] * 1000:.1f} ms, "
        f"in-step {breakdown['in_step_median_s'] * 1000:.1f} ms)"
    )
    return Result(
        name=name,
        description=(
            f"{CHAIN_LENGTH}-step chain of trivial steps on the cluster (Redis, {c.metadata_kind}, local-folder "
            f"artifacts, 1 worker x {WORKER_CONCURRENCY} processes): median wall / {CHAIN_LENGTH} over {repeats} "
            "runs, as a multiple of the raw no-op round trip measured in this run"
        ),
        unit="s",
        value=per_step,
        baseline=rtt_s,
        baseline_source="raw Celery round trip, this run",
        ratio=per_step / rtt_s,
        ratio_meaning="ours / raw",
        target="<= 2x",
        raw={
            "chain_wall_samples_s": samples,
            "chain_wall_median_s": wall,
            "warmup_s": warmup,
            "timeline_medians_s": breakdown,
            "timelines_s": timelines,
        },
    )


def bench_cluster_fanout(
    c: Cluster, seeds: Seeds, raw_wall_s: float, width: int = 1000, repeats: int = 2
) -> Result:
    """Benchmark 8: ``width`` independent steps on the cluster vs ``width`` raw no-op tasks."""
    from bench.pipelines import fan_out

    samples = []
    for _ in range(repeats):
        wall, run = run_timed(fan_out, c.settings, seed=seeds(), width=width, timeout_s=60.0)
        if len(run.steps) != width:
            raise RuntimeError(f"the fan-out run has {len(run.steps)} steps instead of {width}")
        samples.append(wall)
    wall = median(samples)
    progress(
        f"cluster {width}-step fan-out: median {wall:.2f} s = {wall / raw_wall_s:.1f}x raw {width} no-op tasks"
    )
    return Result(
        name="cluster.fanout_1000",
        description=(
            f"{width} independent trivial steps in one run on the cluster (window "
            f"{c.settings.max_queued_per_run}), submit to finished run; vs {width} raw Celery no-op tasks sent "
            "at once on the same Redis and worker size"
        ),
        unit="s",
        value=wall,
        baseline=raw_wall_s,
        baseline_source="raw Celery, this run",
        ratio=wall / raw_wall_s,
        ratio_meaning="ours / raw",
        raw={"samples_s": samples, "steps": width, "steps_per_s": width / wall},
    )
