"""Stop benchmarks: what the solo worker's step host costs per step, and how fast a cancel, a
``timeout_s`` and a warm shutdown take effect on each pool.

A light cluster (Redis, SQLite and a local folder on this machine; see
``tests/integration/light_cluster.py``) with ``zw worker`` processes started as an operator
starts them, and the embedded default in this process. The shipped stop settings, except
``ZW_STOP_GRACE_S=1`` and ``ZW_SHUTDOWN_GRACE_S=1``, so the kill and hand-back paths are
measured in seconds. Times of events inside a step come from the markers the steps of
``tests.pipelines.stopping`` write (their names carry ``time.time_ns()``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.report import Result, median, progress
from bench.services import start_redis
from tests.integration.light_cluster import LightCluster, start_light_cluster, wait_for_marker
from tests.services.process import wait_until

__all__ = ["bench_hand_back", "bench_host_overhead", "bench_stop_latency", "stop_cluster"]

TIMING = {"ZW_STOP_GRACE_S": "1", "ZW_SHUTDOWN_GRACE_S": "1", "ZW_HEARTBEAT_INTERVAL_S": "1"}
CHAIN = 10
RUN_TIMEOUT_S = 60.0


def _marker_time(d: Path, prefix: str, count: int = 1) -> float:
    """Unix time of the ``count``-th ``<prefix>-<ns>-<pid>`` marker."""
    wait_for_marker(d, prefix, RUN_TIMEOUT_S, count=count)
    stamps = sorted(int(p.name.rsplit("-", 2)[1]) for p in d.glob(f"{prefix}-*-*"))
    return stamps[count - 1] / 1e9


@contextlib.contextmanager
def _worker(c: LightCluster, name: str, **kw: Any) -> Iterator[Any]:
    proc = c.start_worker(name, **kw)
    try:
        yield proc
    finally:
        proc.stop(timeout_s=15)
        with contextlib.suppress(ValueError):
            c.workers.remove(proc)


def _chain_per_step(settings: Any, queue: str, repeats: int) -> list[float]:
    from tests.pipelines import stopping as pl
    from zenml_workers import submit

    submit(pl.chain, settings=settings, queue=queue, length=CHAIN).wait(timeout_s=RUN_TIMEOUT_S)
    samples = []
    for i in range(repeats):
        started = time.perf_counter()
        submit(pl.chain, settings=settings, v=i, queue=queue, length=CHAIN).wait(
            timeout_s=RUN_TIMEOUT_S, progress=False
        )
        samples.append((time.perf_counter() - started) / CHAIN)
    return samples


def bench_host_overhead(c: LightCluster, repeats: int) -> Result:
    """Per-step time of a 10-step chain on a solo worker with and without its step host."""
    samples: dict[str, list[float]] = {"host": [], "plain": []}
    for round_ in range(2):  # alternated, so that a noisy minute does not favour one
        for mode in ("host", "plain"):
            env = {"ZW_STEP_HOST": "1" if mode == "host" else "0"}
            with _worker(c, f"gpu-{mode}{round_}@bench", queues="gpu", pool="solo", env=env):
                samples[mode] += _chain_per_step(c.settings(), "gpu", repeats)
    host, plain = median(samples["host"]), median(samples["plain"])
    progress(
        f"solo worker, {CHAIN}-step chain: {host * 1000:.1f} ms/step with the step host, "
        f"{plain * 1000:.1f} ms/step without ({host / plain:.2f}x)"
    )
    return Result(
        name="stop.solo_host_per_step",
        description=(
            f"{CHAIN}-step chain of trivial steps on one solo (gpu-queue) worker, median wall / "
            f"{CHAIN} over {2 * repeats} runs: with its step host (a spawned child runs each "
            "step, stoppable) vs ZW_STEP_HOST=0 (steps in the worker process, unstoppable)"
        ),
        unit="s",
        value=host,
        baseline=plain,
        baseline_source="the same solo worker without the step host, this run",
        ratio=host / plain,
        ratio_meaning="ours / plain solo",
        raw={"samples_s": samples},
    )


def _cancel_once(settings: Any, d: Path, queue: str | None, tag: str) -> dict[str, float]:
    """Cancel a running ``hold``: seconds until the step stopped, and until the pool finished
    a next step. Prefork kills its child (SIGTERM): the stop is its pid's death there."""
    from tests.pipelines import stopping as pl
    from zenml_workers import submit
    from zenml_workers.worker.context import pid_alive

    kw = {"queue": queue} if queue else {}
    handle = submit(pl.holding, settings=settings, marker_dir=str(d), tag=tag, **kw)
    pid = wait_for_marker(d, f"pid-{tag}", RUN_TIMEOUT_S)
    started = time.time()
    handle.cancel()
    wait_until(
        lambda: list(d.glob(f"interrupted-{tag}-*")) or not pid_alive(pid),
        RUN_TIMEOUT_S,
        "the cancelled step to stop",
    )
    markers = list(d.glob(f"interrupted-{tag}-*"))
    stopped = _marker_time(d, f"interrupted-{tag}") if markers else time.time()
    submit(pl.quick, settings=settings, **kw).wait(timeout_s=RUN_TIMEOUT_S, progress=False)
    return {"stopped_s": stopped - started, "next_step_done_s": time.time() - started}


def _timeout_once(settings: Any, d: Path, queue: str | None, tag: str) -> dict[str, float]:
    """``overrun`` (timeout_s=1, one retry) and ``stubborn_overrun``: how late the soft stop
    lands after the timeout, and how late the failure of a step that ignores it is recorded
    after the timeout plus the grace."""
    from tests.pipelines import stopping as pl
    from zenml_workers import Client, submit
    from zenml_workers.errors import StepFailedError

    kw = {"queue": queue} if queue else {}
    with contextlib.suppress(StepFailedError):
        submit(pl.timing_out, settings=settings, marker_dir=str(d), tag=tag, **kw).wait(
            timeout_s=RUN_TIMEOUT_S, progress=False
        )
    late = [
        _marker_time(d, f"interrupted-{tag}", n) - _marker_time(d, f"pid-{tag}", n) - 1.0
        for n in (1, 2)
    ]
    handle = submit(pl.stubbornly_timing_out, settings=settings, marker_dir=str(d), **kw)
    with contextlib.suppress(StepFailedError):
        handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)
    step = Client(settings).get_run(handle.id).steps["stubborn_overrun"]
    started = _marker_time(d, "pid-st")
    grace = settings.stop_grace_s
    return {
        "soft_late_s": median(late),
        "kill_recorded_late_s": (step.ended_at or time.time()) - started - 1.0 - grace,
    }


def _pools(c: LightCluster, workdir: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(pool, settings, queue) for prefork and solo workers and the embedded default."""
    with _worker(c, "cpu@bench", queues="cpu", concurrency=2):
        yield "prefork", c.settings(), "cpu"
    with _worker(c, "gpu@bench", queues="gpu", pool="solo"):
        yield "solo", c.settings(), "gpu"
    from zenml_workers.settings import load_settings

    home = workdir / "embedded"
    yield "embedded", load_settings(home=home, local_workers=2, stop_grace_s=1.0), None


def bench_stop_latency(c: LightCluster, workdir: Path, repeats: int) -> list[Result]:
    """Cancel and timeout latency on each pool."""
    from zenml_workers.sdk.stack import close_stacks

    results = []
    for pool, settings, queue in _pools(c, workdir):
        cancels, timeouts = [], []
        for i in range(repeats):
            d = workdir / f"markers-{pool}-{i}"
            d.mkdir(parents=True)
            cancels.append(_cancel_once(settings, d, queue, "c"))
            timeouts.append(_timeout_once(settings, d, queue, "t"))
        if pool == "embedded":
            close_stacks()
        stop_s = median([x["stopped_s"] for x in cancels])
        next_s = median([x["next_step_done_s"] for x in cancels])
        soft_s = median([x["soft_late_s"] for x in timeouts])
        kill_s = median([x["kill_recorded_late_s"] for x in timeouts])
        progress(
            f"{pool}: cancel stops the step in {stop_s * 1000:.0f} ms (next step done "
            f"{next_s * 1000:.0f} ms after cancel); timeout_s enforced {soft_s * 1000:.0f} ms "
            f"late; a step ignoring it failed {kill_s * 1000:.0f} ms after timeout + grace"
        )
        results.append(
            Result(
                name=f"stop.cancel_{pool}",
                description=(
                    f"{pool}: handle.cancel() of a running step until the step stopped (the "
                    "exception inside it; prefork: its child's death), median of "
                    f"{repeats}; raw: until a next step on that pool finished"
                ),
                unit="s",
                value=stop_s,
                raw={"samples": cancels, "next_step_done_median_s": next_s},
            )
        )
        results.append(
            Result(
                name=f"stop.timeout_{pool}",
                description=(
                    f"{pool}: how late StepTimeoutError lands inside a step after its "
                    f"timeout_s (1 s), median of {2 * repeats}; raw: how late the failure of a "
                    "step that ignores it is recorded after timeout_s + ZW_STOP_GRACE_S (1 s)"
                ),
                unit="s",
                value=soft_s,
                raw={"samples": timeouts, "kill_recorded_late_median_s": kill_s},
            )
        )
    return results


def _hand_back_once(c: LightCluster, d: Path, pool: str, i: int) -> dict[str, float]:
    """SIGTERM to a worker running ``hold`` (grace 1 s): seconds until its step ran again on
    another worker, and until the stopped worker exited."""
    from tests.pipelines import stopping as pl
    from zenml_workers import submit

    settings = c.settings()
    with _worker(c, f"drain-a{i}-{pool}@bench", queues="drain", pool=pool, concurrency=1) as a:
        handle = submit(pl.holding, settings=settings, marker_dir=str(d), queue="drain")
        wait_for_marker(d, "pid-h", RUN_TIMEOUT_S)
        with _worker(c, f"drain-b{i}-{pool}@bench", queues="drain", pool=pool, concurrency=1):
            started = time.time()
            a.send_signal(signal.SIGTERM)
            again = _marker_time(d, "pid-h", 2)
            wait_until(lambda: not a.is_running(), RUN_TIMEOUT_S, "the stopped worker to exit")
            exited = time.time()
            (d / "release-h").touch()
            handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)
    grace = float(TIMING["ZW_SHUTDOWN_GRACE_S"])
    return {"running_elsewhere_after_grace_s": again - started - grace, "exit_s": exited - started}


def bench_hand_back(c: LightCluster, workdir: Path, repeats: int) -> list[Result]:
    results = []
    for pool in ("solo", "prefork"):
        samples = []
        for i in range(repeats):
            d = workdir / f"handback-{pool}-{i}"
            d.mkdir(parents=True)
            samples.append(_hand_back_once(c, d, pool, i))
        value = median([x["running_elsewhere_after_grace_s"] for x in samples])
        progress(
            f"{pool}: warm shutdown hands a running step back; it runs on another worker "
            f"{value * 1000:.0f} ms after the grace (1 s) ended"
        )
        results.append(
            Result(
                name=f"stop.shutdown_hand_back_{pool}",
                description=(
                    f"{pool}: SIGTERM to a worker whose step outlives ZW_SHUTDOWN_GRACE_S (1 s) "
                    "until the step runs on another (idle) worker, minus the grace; median of "
                    f"{repeats}; raw: until the stopped worker exited"
                ),
                unit="s",
                value=value,
                raw={"samples": samples},
            )
        )
    return results


@contextlib.contextmanager
def stop_cluster(workdir: Path) -> Iterator[LightCluster]:
    """The light cluster the stop benchmarks share (Redis of its own, no worker yet)."""
    redis = start_redis(workdir / "stop-redis")
    try:
        c = start_light_cluster(workdir / "stop", redis.db_url(0), timing=TIMING)
        try:
            yield c
        finally:
            from zenml_workers.sdk.stack import close_stacks

            close_stacks()
            c.stop()
    finally:
        redis.stop()
