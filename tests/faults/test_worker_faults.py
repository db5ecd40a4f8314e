"""Killed pool children, killed and restarted workers, a killed scheduler: real processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults.harness import FaultCluster, body_runs, commit_problems, wait_for_pid
from tests.pipelines import faults as pl
from zenml_workers import submit

pytestmark = pytest.mark.services

RUN_TIMEOUT_S = 90.0


def _assert_clean(cluster: FaultCluster, run_id: str, marker: Path, *, reran: set[str]) -> None:
    """Completed, each output committed once by the final attempt, and each body ran once
    except those whose worker died (they ran twice)."""
    assert commit_problems(cluster.metadata, run_id) == []
    steps = ("source", "hold", "branch_1", "branch_2", "branch_3", "join")
    assert body_runs(marker) == {k: 2 if k in reran else 1 for k in steps}


def test_fault_pool_child_killed_mid_step_is_taken_over_by_its_redelivery(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    # No scheduler: only the redelivered message can bring the step back before its lease ends.
    cluster.start_worker("cpu@a", concurrency=2)
    handle = submit(pl.diamond, settings=cluster.settings(), marker_dir=str(tmp_path), seed=2)
    pid = wait_for_pid(tmp_path, "h")

    os.kill(pid, signal.SIGKILL)  # what the OOM killer does to a big step
    (tmp_path / "release-h").touch()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)

    assert run.status == "completed"
    assert run.steps["join"].output.load() == pl.diamond_total(2)
    hold = run.steps["hold"]
    assert hold.attempt == 2
    _assert_clean(cluster, run.id, tmp_path, reran={"hold"})
    worker_log = cluster.workers[0].log_text()
    assert f"attempt 1 lost its worker process {pid} on cpu@a; taking it over" in worker_log


def test_fault_preempted_worker_vm_is_replaced_and_its_step_reruns(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    cluster.start_scheduler()
    doomed = cluster.start_worker("cpu@vm-a")
    handle = submit(pl.diamond, settings=cluster.settings(), marker_dir=str(tmp_path), seed=3)
    wait_for_pid(tmp_path, "h")

    doomed.kill()  # main process and pool children at once: a preempted spot VM
    cluster.start_worker("cpu@vm-b")
    (tmp_path / "release-h").touch()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)

    assert run.status == "completed"
    assert run.steps["hold"].attempt == 2
    assert run.steps["hold"].worker_host == "cpu@vm-b"
    assert run.steps["join"].output.load() == pl.diamond_total(3)
    _assert_clean(cluster, run.id, tmp_path, reran={"hold"})
    assert "workers cpu@vm-a are silent; expired 1 lease(s)" in cluster.scheduler.log_text()  # type: ignore[union-attr]


def test_fault_worker_restarted_under_its_own_name_frees_its_old_leases(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    cluster.start_scheduler()
    first = cluster.start_worker("cpu@vm-a")
    handle = submit(pl.diamond, settings=cluster.settings(), marker_dir=str(tmp_path), seed=4)
    wait_for_pid(tmp_path, "h")

    first.kill()
    again = cluster.start_worker("cpu@vm-a")  # the VM rebooted with the same hostname
    (tmp_path / "release-h").touch()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)

    assert run.status == "completed"
    assert run.steps["hold"].attempt == 2
    _assert_clean(cluster, run.id, tmp_path, reran={"hold"})
    assert "worker cpu@vm-a restarted: expired 1 lease(s)" in again.log_text()


def test_fault_scheduler_killed_while_a_worker_dies_recovers_after_its_restart(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    scheduler = cluster.start_scheduler()
    doomed = cluster.start_worker("cpu@vm-a")
    handle = submit(pl.diamond, settings=cluster.settings(), marker_dir=str(tmp_path), seed=5)
    wait_for_pid(tmp_path, "h")

    scheduler.kill()
    doomed.kill()
    cluster.start_worker("cpu@vm-b")
    (tmp_path / "release-h").touch()
    cluster.start_scheduler()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)

    assert run.status == "completed"
    assert run.steps["hold"].worker_host == "cpu@vm-b"
    _assert_clean(cluster, run.id, tmp_path, reran={"hold"})


def test_fault_solo_worker_killed_mid_step_is_replaced(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    cluster.start_scheduler()
    doomed = cluster.start_worker("solo@vm-a", pool="solo")
    handle = submit(pl.diamond, settings=cluster.settings(), marker_dir=str(tmp_path), seed=6)
    wait_for_pid(tmp_path, "h")

    doomed.kill()
    cluster.start_worker("solo@vm-b", pool="solo")
    (tmp_path / "release-h").touch()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)

    assert run.status == "completed"
    assert run.steps["hold"].worker_host == "solo@vm-b"
    _assert_clean(cluster, run.id, tmp_path, reran={"hold"})


def test_fault_same_task_delivered_three_times_runs_once(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    from scheduler.recovery import RecoveryPolicy, recover
    from zenml_workers.worker.celery_app import create_app, send_steps

    settings = cluster.settings()
    (tmp_path / "release-h").touch()
    handle = submit(pl.diamond, settings=settings, marker_dir=str(tmp_path), seed=7)
    app = create_app(settings)
    try:
        for _ in range(2):  # the broker delivers the first task twice more
            with cluster.metadata.transaction() as s:
                again = recover(s, now=time.time(), policy=RecoveryPolicy(), resend_all_queued=True)
            assert [q.task.invocation_id for q in again] == ["source"]
            send_steps(app, again)
    finally:
        app.close()
    cluster.start_worker("cpu@a", concurrency=2)
    run = handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)

    assert run.status == "completed"
    _assert_clean(cluster, run.id, tmp_path, reran=set())


CLIENT = """
import sys
from pathlib import Path
from tests.pipelines import faults as pl
from zenml_workers import submit
root, n = Path(sys.argv[1]), int(sys.argv[2])
handles = []
for i in range(n):
    d = root / f"run{i}"
    d.mkdir(parents=True)
    (d / "release-h").touch()
    handles.append((d, submit(pl.diamond, marker_dir=str(d), seed=i)))
for d, h in handles:
    run = h.wait(timeout_s=240, progress=False)
    print("RUN", d, run.id, run.status, run.steps["join"].output.load())
"""


def test_fault_storm_of_runs_from_four_clients_is_committed_once(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from tests.services.process import REPO_ROOT, service_env

    cluster.start_scheduler()
    cluster.start_worker("cpu@a", concurrency=2)
    cluster.start_worker("solo@b", pool="solo")
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(tmp_path / f"client{c}"), "5"],
            env=service_env(cluster.env, drop_prefixes=("ZW_",)),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in range(4)
    ]
    results = [c.communicate(timeout=300) for c in clients]

    assert all(c.returncode == 0 for c in clients), [err[-2000:] for _, err in results]
    runs = [
        line.split() for out, _ in results for line in out.splitlines() if line.startswith("RUN")
    ]
    assert len(runs) == 20
    for _, marker, run_id, status, total in runs:
        seed = int(Path(marker).name.removeprefix("run"))
        assert (status, int(total)) == ("completed", pl.diamond_total(seed))
        _assert_clean(cluster, run_id, Path(marker), reran=set())
