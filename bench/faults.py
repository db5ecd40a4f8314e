"""Recovery times: each fault of the fault suite injected into a real cluster, timed.

For every fault the time from injection to the affected step starting again (where a
step restarts) and to its run completing, once with the shipped defaults and once with
the fault suite's short timing. Baselines beside them where Celery has one: a SIGKILLed
pool child of a raw Celery worker with ``acks_late`` + ``reject_on_worker_lost``.
Nothing here asserts; correctness is the fault suite's job (``tests/faults``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import Result, median, progress
from tests.faults.harness import SHORT_TIMING, FaultCluster, start_fault_cluster, wait_for_pid
from tests.pipelines import faults as pl
from tests.services.process import REPO_ROOT, ServiceProcess, service_env, wait_until

__all__ = ["bench_faults"]

RUN_TIMEOUT_S = 600.0
#: ``ZW_*`` timing per profile; "default" is what a user gets without setting anything.
PROFILES: dict[str, dict[str, str]] = {"default": {}, "short": dict(SHORT_TIMING)}


class _Fault:
    """One injected fault: the run it hit, when it was injected, what the test folder is."""

    def __init__(self, cluster: FaultCluster, marker: Path, seed: int) -> None:
        self.cluster = cluster
        self.marker = marker
        marker.mkdir(parents=True, exist_ok=True)
        self.handle = _submit(cluster, marker, seed)
        self.injected = 0.0

    def inject(self, action: Callable[[], object]) -> None:
        wait_for_pid(self.marker, "h", 120)
        self.injected = time.time()
        action()

    def release(self) -> None:
        (self.marker / "release-h").touch()

    def figures(self, *, restarted: bool, since: float | None = None) -> dict[str, float]:
        """Seconds from the injection (or ``since``) to the step's restart and the run's end."""
        run = self.handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)
        t0 = since if since is not None else self.injected
        out = {"complete_s": round((run.ended_at or time.time()) - t0, 2)}
        if restarted:
            pids = sorted(self.marker.glob("pid-h-*"), key=lambda p: p.stat().st_mtime)
            out["restart_s"] = round(pids[-1].stat().st_mtime - t0, 2) if len(pids) > 1 else -1
        out["status_ok"] = float(run.status == "completed")
        return out


def _submit(cluster: FaultCluster, marker: Path, seed: int) -> Any:
    from zenml_workers import submit

    return submit(pl.diamond, settings=cluster.settings(), marker_dir=str(marker), seed=seed)


def _pool_child_kill(c: FaultCluster, d: Path) -> dict[str, float]:
    c.start_worker("cpu@a")
    f = _Fault(c, d, 1)
    f.inject(lambda: os.kill(int(next(d.glob("pid-h-*")).read_text()), signal.SIGKILL))
    f.release()
    return f.figures(restarted=True)


def _worker_vm_lost(c: FaultCluster, d: Path) -> dict[str, float]:
    doomed = c.start_worker("cpu@vm-a")
    f = _Fault(c, d, 2)
    f.inject(doomed.kill)
    c.start_worker("cpu@vm-b")  # a replacement starts at once
    f.release()
    return f.figures(restarted=True)


def _scheduler_down_worker_lost(c: FaultCluster, d: Path) -> dict[str, float]:
    doomed = c.start_worker("cpu@vm-a")
    f = _Fault(c, d, 3)
    assert c.scheduler is not None
    f.inject(lambda: (c.scheduler.kill(), doomed.kill()))  # type: ignore[union-attr]
    c.start_worker("cpu@vm-b")
    f.release()
    back = time.time()
    c.start_scheduler()
    return f.figures(restarted=True, since=back)


def _redis_restart(c: FaultCluster, d: Path) -> dict[str, float]:
    c.start_worker("cpu@a", concurrency=1)
    busy = _Fault(c, d / "busy", 4)
    (d / "lost").mkdir(parents=True)
    (d / "lost" / "release-h").touch()
    wait_for_pid(busy.marker, "h", 120)
    lost = _submit(c, d / "lost", 5)  # queued behind the busy slot, then lost with Redis
    busy.inject(c.redis.restart)
    back = time.time()
    busy.release()
    run = lost.wait(timeout_s=RUN_TIMEOUT_S, progress=False)
    busy.figures(restarted=False)
    return {"complete_s": round((run.ended_at or time.time()) - back, 2)}


def _postgres_down(seconds: float) -> Callable[[FaultCluster, Path], dict[str, float]]:
    def scenario(c: FaultCluster, d: Path) -> dict[str, float]:
        c.start_worker("cpu@a")
        f = _Fault(c, d, 6)
        f.inject(c.postgres.kill)
        f.release()
        time.sleep(seconds)  # the outage itself
        back = time.time()
        c.postgres.start()
        return f.figures(restarted=False, since=back)

    return scenario


def _s3_down(c: FaultCluster, d: Path) -> dict[str, float]:
    c.start_worker("cpu@a")
    f = _Fault(c, d, 7)
    f.inject(c.s3.kill)
    f.release()
    time.sleep(10.0)  # the outage itself
    back = time.time()
    c.s3.start()
    return f.figures(restarted=False, since=back)


def _partition(c: FaultCluster, d: Path) -> dict[str, float]:
    assert c.net is not None
    c.start_worker("cpu@vm1", in_net=True)
    f = _Fault(c, d, 8)
    wait_for_pid(d, "h", 120)
    c.start_worker("cpu@local")
    f.inject(c.net.partition)
    wait_for_pid(d, "h", RUN_TIMEOUT_S, count=2)
    f.release()
    out = f.figures(restarted=True)
    remaining = 30.0 - (time.time() - f.injected)
    if remaining > 0:
        time.sleep(remaining)  # a 30 s partition in all
    c.net.heal()
    return out


def _broker_down_at_submit(c: FaultCluster, d: Path) -> dict[str, float]:
    c.start_worker("cpu@a")
    d.mkdir(parents=True, exist_ok=True)
    (d / "release-h").touch()
    c.redis.kill()
    handle = _submit(c, d, 9)
    time.sleep(3.0)
    back = time.time()
    c.redis.start()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)
    return {"complete_s": round((run.ended_at or time.time()) - back, 2)}


#: name, scenario, what "from" means for its figures.
SCENARIOS: list[tuple[str, Callable[[FaultCluster, Path], dict[str, float]], str]] = [
    ("pool_child_kill", _pool_child_kill, "the SIGKILL of the pool child running the step"),
    ("worker_vm_lost", _worker_vm_lost, "the SIGKILL of the worker's whole process tree"),
    ("scheduler_restart", _scheduler_down_worker_lost, "the scheduler's restart"),
    ("redis_restart", _redis_restart, "Redis back (empty) after its restart"),
    ("postgres_down_3s", _postgres_down(3.0), "PostgreSQL back after 3 s down"),
    ("postgres_down_12s", _postgres_down(12.0), "PostgreSQL back after 12 s down"),
    ("s3_down_10s", _s3_down, "S3 back after 10 s down"),
    ("partition_30s", _partition, "the partition of the step's worker host"),
    ("broker_down_at_submit", _broker_down_at_submit, "Redis back after submit() ran without it"),
]

#: The issue's bar for each fault with default settings (seconds to the run's end/restart).
BARS = {
    "pool_child_kill": ("restart_s", 5.0),
    "worker_vm_lost": ("restart_s", 15.0),
    "scheduler_restart": ("complete_s", 30.0),
    "redis_restart": ("complete_s", 40.0),
    "postgres_down_3s": ("complete_s", 40.0),
    "postgres_down_12s": ("complete_s", 40.0),
}


def _raw_celery_child_kill(workdir: Path, repeats: int) -> list[float]:
    """Seconds from SIGKILLing a raw Celery pool child to its task running again."""
    from tests.services.redis import start_redis

    redis = start_redis(workdir / "raw-redis")
    worker = None
    try:
        env = {"BENCH_BROKER_URL": redis.url}
        worker = ServiceProcess(
            "raw celery hold worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.raw_hold_app",
                "worker",
                "-Q",
                "bench-hold",
                "-c",
                "2",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=WARNING",
            ],  # fmt: skip
            log_path=workdir / "raw-hold-worker.log",
            env=service_env(env, drop_prefixes=("ZW_",)),
            cwd=REPO_ROOT,
        ).start()
        from bench.raw_hold_app import make_app

        app = make_app(redis.url)
        samples = []
        for i in range(repeats):
            d = workdir / f"raw-hold-{i}"
            d.mkdir()
            app.send_task("bench.hold", args=[str(d)], queue="bench-hold")
            wait_until(lambda d=d: list(d.glob("pid-*")), 60, "the raw hold task to start")
            pid = int(next(d.glob("pid-*")).read_text())
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda d=d: len(list(d.glob("pid-*"))) > 1, 60, "the raw task to rerun")
            again = max(p.stat().st_mtime for p in d.glob("pid-*"))
            samples.append(again - killed)
            (d / "release").touch()
        app.close()
        return samples
    finally:
        if worker is not None:
            worker.stop()
        redis.stop()


def bench_faults(
    workdir: Path, *, profiles: tuple[str, ...] = ("default", "short")
) -> list[Result]:
    """Every fault under each timing profile, plus the raw-Celery pool-child baseline."""
    raw = _raw_celery_child_kill(workdir, repeats=3)
    raw_s = median(raw)
    progress(f"raw Celery pool-child kill -> rerun: {raw_s:.2f} s")
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for profile in profiles:
        cluster = start_fault_cluster(
            workdir / f"faults-{profile}", timing=PROFILES[profile], with_net=True
        )
        try:
            for name, scenario, _ in SCENARIOS:
                cluster.ensure_services()
                cluster.redis.flushall()
                cluster.start_scheduler()
                try:
                    got = scenario(cluster, workdir / f"{profile}-{name}")
                except Exception as e:  # one broken scenario must not hide the others
                    got = {"error": 1.0}
                    progress(f"fault {name} ({profile}) FAILED: {type(e).__name__}: {e}")
                finally:
                    cluster.stop_processes()
                figures.setdefault(name, {})[profile] = got
                progress(f"fault {name} ({profile}): {got}")
        finally:
            cluster.stop()
    results = [
        Result(
            name="faults.raw_celery_child_kill",
            description="raw Celery (acks_late, reject_on_worker_lost): SIGKILL of the pool child "
            "running a task -> the task runs again",
            unit="s",
            value=raw_s,
            raw={"samples_s": raw},
        )
    ]
    for name, _, since in SCENARIOS:
        per = figures.get(name, {})
        default = per.get("default", {})
        key, bar = BARS.get(name, ("complete_s", None))
        value = default.get(key, default.get("complete_s", -1.0))
        baseline = raw_s if name == "pool_child_kill" else bar
        results.append(
            Result(
                name=f"faults.{name}",
                description=f"seconds from {since} to the step's restart (restart_s) and the "
                "run's completion (complete_s); value: the issue's measure with default settings",
                unit="s",
                value=value,
                baseline=baseline,
                baseline_source="raw Celery, this run"
                if name == "pool_child_kill"
                else "issue bar",
                ratio=(value / baseline) if baseline and value >= 0 else None,
                ratio_meaning="ours / baseline (<= 1 meets the bar)",
                target=f"{key} <= {bar:g} s with default settings" if bar else "",
                raw=per,
            )
        )
    return results
