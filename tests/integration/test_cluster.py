"""The distributed path against real processes: Redis, PostgreSQL, SeaweedFS S3, Celery workers, Flower."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scheduler.recovery import RecoveryPolicy
from scheduler.service import SchedulerService
from tests.pipelines import cluster as pl
from tests.services.celery import REPO_ROOT, service_env, start_celery_worker
from tests.services.process import TEST_SECRET_KEY, ServiceProcess, wait_until
from zenml_workers import Client, submit
from zenml_workers.errors import NoWorkerForQueueError, StepFailedError
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings

pytestmark = pytest.mark.services

LEASE_S = 30.0


@dataclass
class Cluster:
    settings: Settings
    env: dict[str, str]
    cpu: ServiceProcess
    gpu: ServiceProcess


@pytest.fixture(scope="module")
def cluster(
    redis_server, postgres_server, s3_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster")
    env = {
        "ZW_BROKER_URL": redis_server.db_url(3),
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_METADATA_URL": postgres_server.create_database(f"cluster_{uuid.uuid4().hex[:8]}"),
        "ZW_ARTIFACT_URI": f"s3://{s3_server.make_bucket()}/artifacts",
        "ZW_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "ZW_S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "ZW_S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "ZW_S3_REGION": s3_server.region,
        "ZW_QUEUES": "cpu,gpu,nowhere",
        "ZW_SKIP_GPU_CHECK": "1",
        "ZW_HEARTBEAT_INTERVAL_S": "1",
        "ZW_LEASE_S": str(LEASE_S),
        "ZW_HOME": str(logs / "home"),
    }
    settings = Settings(
        broker_url=env["ZW_BROKER_URL"],
        secret_key=TEST_SECRET_KEY,
        metadata_url=env["ZW_METADATA_URL"],
        artifact_uri=env["ZW_ARTIFACT_URI"],
        s3_endpoint_url=env["ZW_S3_ENDPOINT_URL"],
        s3_access_key_id=env["ZW_S3_ACCESS_KEY_ID"],
        s3_secret_access_key=env["ZW_S3_SECRET_ACCESS_KEY"],
        s3_region=env["ZW_S3_REGION"],
        queues=["cpu", "gpu", "nowhere"],
        heartbeat_interval_s=1,
        lease_s=LEASE_S,
        home=logs / "home",
    )
    cpu = start_celery_worker("zenml_workers.worker", ["cpu"], 2, env, "cpu@zwtest", log_dir=logs)
    try:
        gpu = start_celery_worker(
            "zenml_workers.worker", ["gpu"], 1, env, "gpu@zwtest", pool="solo", log_dir=logs
        )
    except BaseException:
        cpu.stop()
        raise
    try:
        yield Cluster(settings=settings, env=env, cpu=cpu, gpu=gpu)
    finally:
        close_stacks()
        gpu.stop()
        cpu.stop()


def test_cluster_routes_trainer_steps_to_the_gpu_worker(cluster: Cluster) -> None:
    run = submit(pl.routed, settings=cluster.settings, x=4).wait(timeout_s=60)

    assert run.status == "completed"
    assert run.steps["fit"].queue == "gpu"
    assert run.steps["fit"].worker_host == "gpu@zwtest"
    assert {run.steps[s].worker_host for s in ("make", "add_one")} == {"cpu@zwtest"}
    assert run.steps["fit"].outputs["model"].load() == 50
    assert run.steps["fit"].outputs["model"].uri.startswith("s3://")
    assert "making 4" in run.steps["make"].logs


def test_cluster_fan_out_runs_steps_concurrently(cluster: Cluster) -> None:
    run = submit(pl.fan, settings=cluster.settings, seed=int(time.time()), width=4).wait(
        timeout_s=60
    )

    intervals = [
        run.steps[k].outputs["interval"].load() for k in run.steps if k.startswith("slow_part")
    ]
    assert run.steps["gather"].output.load() == 4
    assert len({i["pid"] for i in intervals}) == 2  # both pool processes took steps
    overlapping = [
        (a["i"], b["i"])
        for a in intervals
        for b in intervals
        if a["i"] < b["i"] and a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlapping, f"no two fan-out steps overlapped in time: {intervals}"


def test_cluster_runs_a_step_defined_in_main(cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "notebook_like.py"
    script.write_text(
        textwrap.dedent("""
        from typing import Annotated
        from zenml_workers import pipeline, step

        SECRET = 41

        @step
        def only_here(x: int) -> Annotated[int, "answer"]:
            return x + SECRET

        @pipeline(enable_cache=False)
        def from_main(x: int = 1):
            only_here(x)

        run = from_main(x=1)
        print("RESULT", run.id, run.steps["only_here"].output.load(), run.steps["only_here"].worker_host)
    """)
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        env=service_env(cluster.env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    _, run_id, value, host = next(
        line for line in out.stdout.splitlines() if line.startswith("RESULT")
    ).split()
    assert (value, host) == ("42", "cpu@zwtest")
    source = Client(cluster.settings).get_run(run_id)
    assert source.steps["only_here"].status == "completed"


def test_cluster_failing_step_fails_the_run_with_its_traceback(cluster: Cluster) -> None:
    handle = submit(pl.failing, settings=cluster.settings, x=3)
    with pytest.raises(StepFailedError) as info:
        handle.wait(timeout_s=60)

    assert info.value.step == "explode"
    assert 'raise ValueError(f"bad value {x}")' in info.value.remote_traceback
    run = Client(cluster.settings).get_run(handle.id)
    assert run.status == "failed"
    assert run.steps["explode"].status == "failed"
    assert run.steps["add_one"].status == "skipped"
    assert "ValueError: bad value 3" in run.steps["explode"].exception


def _pid_files(d: Path) -> list[Path]:
    return sorted(d.glob("pid-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cluster_cancel_stops_a_running_step(cluster: Cluster, tmp_path: Path) -> None:
    handle = submit(pl.holding, settings=cluster.settings, marker_dir=str(tmp_path))
    wait_until(lambda: _pid_files(tmp_path), 30, "the step to start")
    pid = int(_pid_files(tmp_path)[0].read_text())

    handle.cancel()

    assert handle.status == "cancelled"
    wait_until(lambda: not _alive(pid), 30, f"the step's process {pid} to be stopped")
    run = Client(cluster.settings).get_run(handle.id)
    assert run.steps["hold"].status == "cancelled"
    assert run.steps["add_one"].status == "cancelled"
    assert not list(tmp_path.glob("finished-*"))
    # The worker is free again: the next run completes.
    assert (
        submit(pl.routed, settings=cluster.settings, x=7).wait(timeout_s=60).status == "completed"
    )


def test_cluster_reports_a_queue_without_workers(cluster: Cluster) -> None:
    handle = submit(pl.unroutable, settings=cluster.settings)

    assert handle.blocked_queues() == {"nowhere": ["stranded"]}
    with pytest.raises(NoWorkerForQueueError, match="queue 'nowhere'.*zw worker --queues nowhere"):
        handle.wait(timeout_s=2, progress=False)
    handle.cancel()


def test_cluster_recovers_a_step_whose_worker_was_killed(cluster: Cluster, tmp_path: Path) -> None:
    handle = submit(pl.holding, settings=cluster.settings, marker_dir=str(tmp_path))
    wait_until(lambda: _pid_files(tmp_path), 30, "the step to start")
    pid = int(_pid_files(tmp_path)[0].read_text())

    os.kill(pid, signal.SIGKILL)
    (tmp_path / "release").write_text("go")
    # Redis redelivers the killed child's message at once, but the lease in SQL is still held by
    # attempt 1, so that delivery is dropped; the scheduler requeues once the lease has expired.
    stack_metadata = Client(cluster.settings)._stack.metadata
    service = SchedulerService(
        stack_metadata,
        lambda queued: __import__(
            "zenml_workers.worker.celery_app", fromlist=["send_steps"]
        ).send_steps(handle._stack.orchestrator.app, queued),
        policy=RecoveryPolicy(),
    )
    requeued = service.run_once(now=time.time() + LEASE_S + 1)

    assert [q.task.invocation_id for q in requeued] == ["hold"]
    run = handle.wait(timeout_s=60)
    assert run.status == "completed"
    assert run.steps["hold"].attempt == 2
    assert run.steps["hold"].output.load() != pid
    assert "/hold.2." in run.steps["hold"].output.uri
    from sqlalchemy import func, select

    from stores.metadata.models import LineageRow

    with stack_metadata.read() as s:
        committed = s.execute(
            select(func.count()).where(
                LineageRow.step_run_id == run.steps["hold"].id, LineageRow.direction == "output"
            )
        ).scalar_one()
    assert committed == 1


def test_cluster_flower_lists_step_tasks_by_step_name(cluster: Cluster, start_flower) -> None:
    flower = start_flower(cluster.settings.reveal_broker_url())
    flower.wait_for_worker("cpu@zwtest")
    run = submit(pl.routed, settings=cluster.settings, x=int(time.time())).wait(timeout_s=60)

    def names() -> set[str]:
        return {t.get("name") for t in flower.tasks().values()}

    wait_until(
        lambda: {"routed.make", "routed.add_one", "routed.fit"} <= names(),
        30,
        "Flower to list the steps",
    )
    task = next(t for t in flower.tasks().values() if t.get("name") == "routed.fit")
    assert run.id in json.dumps(task.get("kwargs"))
    assert task.get("state") == "SUCCESS"


def test_cluster_worker_refuses_gpu_queue_without_a_gpu(cluster: Cluster, tmp_path: Path) -> None:
    env = {k: v for k, v in service_env(cluster.env).items() if k != "ZW_SKIP_GPU_CHECK"}
    env["PATH"] = "/usr/bin:/bin"  # no nvidia-smi here
    for argv in (
        [sys.executable, "-m", "zenml_workers.cli", "worker", "--queues", "gpu"],
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "zenml_workers.worker",
            "worker",
            "-Q",
            "gpu",
            "-P",
            "solo",
            "--without-mingle",
            "--without-gossip",
        ],
    ):
        out = subprocess.run(
            argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode != 0, argv
        assert "sees no GPU" in out.stderr + out.stdout, argv
        assert "--skip-gpu-check" in out.stderr + out.stdout, argv


def test_cluster_small_run_is_not_starved_by_a_big_fan_out(cluster: Cluster) -> None:
    narrow = cluster.settings.model_copy(update={"max_queued_per_run": 4})
    big = submit(pl.wide, settings=narrow, seed=int(time.time()), width=200)
    little = submit(pl.small, settings=narrow, x=int(time.time()))

    small_run = little.wait(timeout_s=60)
    assert big.status == "running", (
        "the small run should finish while the big fan-out is still going"
    )
    big_run = big.wait(timeout_s=120)
    assert small_run.ended_at is not None and big_run.ended_at is not None
    assert small_run.ended_at < big_run.ended_at
    assert sum(1 for s in big_run.steps.values() if s.status == "completed") == 200


def test_cluster_scheduler_service_flags_runs_on_dead_queues(
    cluster: Cluster, tmp_path: Path
) -> None:
    service = ServiceProcess(
        "zw scheduler",
        [sys.executable, "-m", "scheduler"],
        log_path=tmp_path / "scheduler.log",
        env=service_env({**cluster.env, "ZW_SCHEDULER_INTERVAL_S": "0.5"}),
        cwd=REPO_ROOT,
    ).start()
    try:
        handle = submit(pl.unroutable, settings=cluster.settings)
        client = Client(cluster.settings)
        wait_until(
            lambda: "no live worker" in client.get_run(handle.id).message,
            30,
            "the scheduler to flag the run",
        )
        assert "zw worker --queues nowhere" in client.get_run(handle.id).message
        handle.cancel()
    finally:
        service.stop()


def test_cluster_cli_prints_step_logs_and_runs(cluster: Cluster) -> None:
    run = submit(pl.routed, settings=cluster.settings, x=int(time.time()) % 1000 + 5000).wait(
        timeout_s=60
    )
    env = service_env(cluster.env)

    logs = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "logs", run.id, "make"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "show", run.id[:8]],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert logs.returncode == 0, logs.stderr
    assert f"making {run.config['parameters']['x']}" in logs.stdout
    assert shown.returncode == 0, shown.stderr
    assert "gpu@zwtest" in shown.stdout and "completed" in shown.stdout


def test_cluster_gpu_worker_runs_one_solo_process_per_gpu(cluster: Cluster, tmp_path: Path) -> None:
    from sqlalchemy import select

    from stores.metadata.models import WorkerRow

    supervisor = ServiceProcess(
        "zw worker gpu x2",
        [
            sys.executable,
            "-m",
            "zenml_workers.cli",
            "worker",
            "--queues",
            "gpu",
            "--concurrency",
            "2",
            "--skip-gpu-check",
            "--hostname",
            "gpux@zwtest",
        ],
        log_path=tmp_path / "gpu-workers.log",
        env=service_env(cluster.env),
        cwd=REPO_ROOT,
    ).start()
    metadata = Client(cluster.settings)._stack.metadata

    def registered() -> set[str]:
        with metadata.read() as s:
            rows = s.execute(
                select(WorkerRow.name, WorkerRow.queues).where(WorkerRow.stopped.is_(False))
            )
            return {name for name, queues in rows if name.startswith("gpux") and queues == ["gpu"]}

    try:
        wait_until(
            lambda: registered() == {"gpux0@zwtest", "gpux1@zwtest"},
            60,
            "both GPU workers to register",
        )
    finally:
        supervisor.stop(timeout_s=30)
    assert registered() == set()  # both children shut down and said so


def test_cluster_step_over_its_timeout_fails_with_a_time_limit(cluster: Cluster) -> None:
    handle = submit(pl.too_slow, settings=cluster.settings)
    with pytest.raises(
        StepFailedError, match="StepTimeoutError: step .overrun. ran past its timeout_s of 1 s"
    ) as info:
        handle.wait(timeout_s=60)

    assert info.value.step == "overrun"
    assert Client(cluster.settings).get_run(handle.id).steps["overrun"].status == "failed"
