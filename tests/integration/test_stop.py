"""Stop means stop: cancel, ``timeout_s`` and warm shutdown on the solo (GPU) worker's step host,
on prefork workers and on the embedded default, with real ``zw worker`` processes.

The GPU path runs CPU-only: ``zw worker --queues gpu --skip-gpu-check`` with
``CUDA_VISIBLE_DEVICES`` set, as on a GPU machine. Stop timing is short (a step that ignores
a stop is killed after 1 s), so every wait below is a condition with a generous timeout.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from stores.metadata.models import StepRunRow
from tests.integration.light_cluster import (
    LightCluster,
    marker_pids,
    marker_texts,
    start_light_cluster,
    wait_for_marker,
)
from tests.pipelines import fixtures
from tests.pipelines import stopping as pl
from tests.services.process import wait_until
from zenml_workers import Client, submit
from zenml_workers.errors import RunCancelledError, StepFailedError
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings

pytestmark = pytest.mark.services

RUN_TIMEOUT_S = 60.0
local_stack = fixtures.local_stack


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LightCluster]:
    redis_server.flushall()
    c = start_light_cluster(tmp_path_factory.mktemp("stop"), redis_server.db_url(6))
    try:
        c.start_worker("gpu@stop", queues="gpu", pool="solo")
        c.start_worker("cpu@stop", queues="cpu", concurrency=2)
        yield c
    finally:
        close_stacks()
        c.stop()


def _alive(pid: int) -> bool:
    from zenml_workers.worker.context import pid_alive

    return pid_alive(pid)


def _host_pid(cluster: LightCluster) -> int:
    """The gpu worker's step host process, as a step it ran reports it."""
    run = submit(pl.quick, settings=cluster.settings(), queue="gpu").wait(timeout_s=RUN_TIMEOUT_S)
    return int(run.steps["pid_of"].output.load())


def _row(cluster: LightCluster, step_run_id: str) -> StepRunRow:
    with cluster.metadata.read() as s:
        row = s.get(StepRunRow, step_run_id)
        assert row is not None
        return row


# -- the solo worker's step host ---------------------------------------------------------------


def test_stop_cancel_stops_a_running_solo_step_and_its_host_stays_warm(
    cluster: LightCluster, tmp_path: Path
) -> None:
    host = _host_pid(cluster)
    handle = submit(pl.holding, settings=cluster.settings(), marker_dir=str(tmp_path), queue="gpu")
    pid = wait_for_marker(tmp_path, "pid-h")

    handle.cancel()

    wait_for_marker(tmp_path, "interrupted-h")  # nothing releases it: only the stop ends it
    assert marker_texts(tmp_path, "interrupted-h") == ["StepStopped"]
    assert marker_pids(tmp_path, "interrupted-h") == [pid] == [host]
    # The gpu worker takes its next step at once, in the same warm process.
    assert _host_pid(cluster) == host
    run = Client(cluster.settings()).get_run(handle.id)
    assert run.status == "cancelled"
    assert run.steps["hold"].status == "cancelled"
    assert not list(tmp_path.glob("finished-*"))


def test_stop_solo_step_that_ignores_cancel_is_killed_and_its_host_replaced(
    cluster: LightCluster, tmp_path: Path
) -> None:
    handle = submit(
        pl.stubborn_holding, settings=cluster.settings(), marker_dir=str(tmp_path), queue="gpu"
    )
    pid = wait_for_marker(tmp_path, "pid-s")

    handle.cancel()

    wait_until(lambda: not _alive(pid), RUN_TIMEOUT_S, f"step host process {pid} to be killed")
    assert marker_pids(tmp_path, "interrupted-s") == [pid]  # it was asked first, and ignored it
    fresh = _host_pid(cluster)
    assert fresh != pid
    assert Client(cluster.settings()).get_run(handle.id).steps["stubborn"].status == "cancelled"


def test_stop_solo_timeout_fails_with_step_timeout_error_and_is_retried(
    cluster: LightCluster, tmp_path: Path
) -> None:
    handle = submit(
        pl.timing_out, settings=cluster.settings(), marker_dir=str(tmp_path), queue="gpu"
    )
    with pytest.raises(StepFailedError, match="StepTimeoutError: step 'overrun' ran past"):
        handle.wait(timeout_s=RUN_TIMEOUT_S)

    step = Client(cluster.settings()).get_run(handle.id).steps["overrun"]
    assert (step.status, step.attempt) == ("failed", 2)  # retries=1: both attempts timed out
    assert len(marker_pids(tmp_path, "interrupted-t")) == 2


def test_stop_solo_timeout_kills_a_step_that_ignores_it(
    cluster: LightCluster, tmp_path: Path
) -> None:
    handle = submit(
        pl.stubbornly_timing_out, settings=cluster.settings(), marker_dir=str(tmp_path), queue="gpu"
    )
    with pytest.raises(StepFailedError, match="was killed 1 s later") as info:
        handle.wait(timeout_s=RUN_TIMEOUT_S)

    pid = marker_pids(tmp_path, "pid-st")[0]
    assert not _alive(pid)
    assert "StepTimeoutError" in str(info.value)
    assert _host_pid(cluster) != pid


def test_stop_solo_host_killed_mid_step_is_replaced_and_takes_the_step_over(
    cluster: LightCluster, tmp_path: Path
) -> None:
    import os

    handle = submit(pl.holding, settings=cluster.settings(), marker_dir=str(tmp_path), queue="gpu")
    pid = wait_for_marker(tmp_path, "pid-h")

    os.kill(pid, signal.SIGKILL)  # what the OOM killer does to a step that outgrew its GPU box
    second = wait_for_marker(tmp_path, "pid-h", count=2)
    (tmp_path / "release-h").touch()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S)

    hold = run.steps["hold"]
    assert run.status == "completed"
    assert (hold.attempt, hold.worker_host) == (2, "gpu@stop")
    assert hold.output.load() == second != pid
    log = next(w for w in cluster.workers if "gpu@stop" in w.name).log_text()
    assert f"step host process {pid} died" in log


# -- prefork -----------------------------------------------------------------------------------


def test_stop_prefork_timeout_fails_with_step_timeout_error_and_is_retried(
    cluster: LightCluster, tmp_path: Path
) -> None:
    handle = submit(pl.timing_out, settings=cluster.settings(), marker_dir=str(tmp_path))
    with pytest.raises(StepFailedError, match="StepTimeoutError: step 'overrun' ran past"):
        handle.wait(timeout_s=RUN_TIMEOUT_S)

    step = Client(cluster.settings()).get_run(handle.id).steps["overrun"]
    assert (step.status, step.attempt) == ("failed", 2)
    assert len(marker_pids(tmp_path, "interrupted-t")) == 2


def test_stop_prefork_timeout_kill_is_recorded_by_the_worker(
    cluster: LightCluster, tmp_path: Path
) -> None:
    handle = submit(pl.stubbornly_timing_out, settings=cluster.settings(), marker_dir=str(tmp_path))
    with pytest.raises(StepFailedError, match="was killed 1 s later"):
        handle.wait(timeout_s=RUN_TIMEOUT_S)

    step = Client(cluster.settings()).get_run(handle.id).steps["stubborn_overrun"]
    assert (step.status, step.attempt) == ("failed", 1)  # no retries: recorded once, not requeued


# -- warm shutdown -----------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_stop_warm_shutdown_lets_a_step_finish_within_the_grace(
    cluster: LightCluster, tmp_path: Path, pool: str
) -> None:
    worker = cluster.start_worker(f"drain-{pool}@stop", queues="drain", pool=pool, concurrency=1)
    handle = submit(
        pl.holding,
        settings=cluster.settings(),
        marker_dir=str(tmp_path),
        queue="drain",
        then="cpu",  # this worker is gone by then
    )
    wait_for_marker(tmp_path, "pid-h")

    worker.send_signal(signal.SIGTERM)
    (tmp_path / "release-h").touch()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S)

    wait_until(lambda: not worker.is_running(), RUN_TIMEOUT_S, "the worker to exit")
    assert worker.returncode == 0
    assert (run.status, run.steps["hold"].attempt) == ("completed", 1)
    assert run.steps["hold"].worker_host == f"drain-{pool}@stop"


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_stop_warm_shutdown_hands_a_step_back_after_the_grace_without_costing_an_attempt(
    cluster: LightCluster, tmp_path: Path, pool: str
) -> None:
    quick_grace = {"ZW_SHUTDOWN_GRACE_S": "1"}
    first = cluster.start_worker(
        f"drain-a-{pool}@stop", queues="drain", pool=pool, concurrency=1, env=quick_grace
    )
    handle = submit(
        pl.holding, settings=cluster.settings(), marker_dir=str(tmp_path), queue="drain"
    )
    pid = wait_for_marker(tmp_path, "pid-h")

    first.send_signal(signal.SIGTERM)
    wait_until(lambda: not first.is_running(), RUN_TIMEOUT_S, "the first worker to exit")
    second = cluster.start_worker(f"drain-b-{pool}@stop", queues="drain", pool=pool, concurrency=1)
    (tmp_path / "release-h").touch()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S)
    second.stop()

    hold = run.steps["hold"]
    assert first.returncode == 0
    assert marker_texts(tmp_path, "interrupted-h") == ["StepStopped"]
    assert marker_pids(tmp_path, "interrupted-h") == [pid]
    assert (run.status, hold.worker_host) == ("completed", f"drain-b-{pool}@stop")
    row = _row(cluster, hold.id)
    # The step has no retries: after the hand-back it still has every attempt it started with.
    assert row.max_attempts - row.attempt == 0 == hold.attempt - 2


def test_stop_second_signal_hands_back_at_once(cluster: LightCluster, tmp_path: Path) -> None:
    long_grace = {"ZW_SHUTDOWN_GRACE_S": "600"}  # a test that waited for it would time out
    first = cluster.start_worker("drain-c@stop", queues="drain", concurrency=1, env=long_grace)
    handle = submit(
        pl.holding, settings=cluster.settings(), marker_dir=str(tmp_path), queue="drain"
    )
    pid = wait_for_marker(tmp_path, "pid-h")

    first.send_signal(signal.SIGTERM)
    # Two signals sent at once arrive as one: send the second once the first was handled.
    first.wait_for_log("Warm shutdown", RUN_TIMEOUT_S)
    first.send_signal(signal.SIGTERM)
    wait_until(lambda: not first.is_running(), RUN_TIMEOUT_S, "the first worker to exit")
    second = cluster.start_worker("drain-d@stop", queues="drain", concurrency=1)
    (tmp_path / "release-h").touch()
    run = handle.wait(timeout_s=RUN_TIMEOUT_S)
    second.stop()

    assert marker_pids(tmp_path, "interrupted-h") == [pid]
    assert (run.status, run.steps["hold"].worker_host) == ("completed", "drain-d@stop")


# -- the embedded default ----------------------------------------------------------------------


def test_stop_embedded_timeout_fails_with_step_timeout_error_and_is_retried(
    local_stack: Settings, tmp_path: Path
) -> None:
    with pytest.raises(StepFailedError, match="StepTimeoutError: step 'overrun' ran past"):
        pl.timing_out(marker_dir=str(tmp_path))

    assert len(marker_pids(tmp_path, "interrupted-t")) == 2


def test_stop_embedded_step_that_ignores_cancel_is_killed_and_the_pool_goes_on(
    local_stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZW_STOP_GRACE_S", "1")
    handle = submit(pl.stubborn_holding, marker_dir=str(tmp_path))
    pid = wait_for_marker(tmp_path, "pid-s")

    handle.cancel()

    with pytest.raises(RunCancelledError):
        handle.wait(timeout_s=RUN_TIMEOUT_S)
    wait_until(lambda: not _alive(pid), RUN_TIMEOUT_S, f"local worker process {pid} to be killed")
    assert marker_pids(tmp_path, "interrupted-s") == [pid]
    # Two processes again (the killed one was replaced): two holds run side by side.
    both = submit(pl.pair, marker_dir=str(tmp_path))
    pids = {wait_for_marker(tmp_path, "pid-p1"), wait_for_marker(tmp_path, "pid-p2")}
    (tmp_path / "release-p1").touch()
    (tmp_path / "release-p2").touch()
    assert both.wait(timeout_s=RUN_TIMEOUT_S).status == "completed"
    assert len(pids) == 2 and pid not in pids


def test_stop_embedded_timeout_kills_a_step_that_ignores_it(
    local_stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZW_STOP_GRACE_S", "1")
    with pytest.raises(StepFailedError, match="was killed 1 s later"):
        pl.stubbornly_timing_out(marker_dir=str(tmp_path))

    pid = marker_pids(tmp_path, "pid-st")[0]
    assert not _alive(pid)
    assert pl.quick(v=1).status == "completed"  # the pool replaced the killed process
