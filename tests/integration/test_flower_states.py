"""Flower tells the truth: each step task ends in the state its step did, on a prefork worker
and on a solo (GPU) worker's step host, and a run's tasks can be found by its run id.

Asked of a real Flower over its HTTP API (``/api/tasks``), on a real cluster of ``zw worker``
processes (Redis, SQLite, a local artifact folder).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.light_cluster import LightCluster, start_light_cluster, wait_for_marker
from tests.pipelines import stopping as pl
from tests.services.flower import FlowerServer
from tests.services.process import wait_until
from zenml_workers import submit
from zenml_workers.errors import StepFailedError
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.worker.signing import SIGNATURE

pytestmark = pytest.mark.services

TIMEOUT_S = 60.0
POOLS = {"cpu": "cpu@flower", "gpu": "gpu@flower"}  # prefork, and solo with its step host


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LightCluster]:
    redis_server.flushall()
    c = start_light_cluster(tmp_path_factory.mktemp("flower"), redis_server.db_url(7))
    try:
        c.start_worker(POOLS["cpu"], queues="cpu", concurrency=2)
        c.start_worker(POOLS["gpu"], queues="gpu", pool="solo")
        yield c
    finally:
        close_stacks()
        c.stop()


@pytest.fixture()
def flower(cluster: LightCluster, start_flower: Any) -> FlowerServer:
    server: FlowerServer = start_flower(cluster.env["ZW_BROKER_URL"])
    for node in POOLS.values():
        server.wait_for_worker(node)
    return server


def _tasks_of(flower: FlowerServer, run_id: str) -> dict[str, dict[str, Any]]:
    """Flower's tasks found by searching for ``run_id``, as its task list does."""
    query = urllib.parse.urlencode({"search": run_id})
    found: dict[str, dict[str, Any]] = flower.get_json(f"/api/tasks?{query}")
    return found


def _states(flower: FlowerServer, run_id: str) -> dict[str, str]:
    return {t["name"]: t["state"] for t in _tasks_of(flower, run_id).values()}


def _wait_for_states(flower: FlowerServer, run_id: str, want: dict[str, str]) -> None:
    wait_until(
        lambda: _states(flower, run_id) == want,
        TIMEOUT_S,
        f"Flower to show {want} for run {run_id} (it shows {_states(flower, run_id)})",
    )


@pytest.mark.parametrize("queue", ["cpu", "gpu"])
def test_flower_shows_a_completed_step_as_success_with_its_run_id(
    cluster: LightCluster, flower: FlowerServer, queue: str
) -> None:
    run = submit(pl.chain, settings=cluster.settings(), v=1, queue=queue, length=2).wait(
        timeout_s=TIMEOUT_S
    )

    _wait_for_states(flower, run.id, {"chain.pid_of": "SUCCESS", "chain.pid_of_2": "SUCCESS"})
    for task in _tasks_of(flower, run.id).values():
        assert task["worker"] == POOLS[queue]
        # The list shows the run and the step, never the signed message.
        shown = json.dumps([task["args"], task["kwargs"]])
        assert run.id in shown
        assert SIGNATURE not in shown and "step_run_id" not in shown


@pytest.mark.parametrize("queue", ["cpu", "gpu"])
def test_flower_shows_a_failed_step_as_failure_with_its_exception(
    cluster: LightCluster, flower: FlowerServer, queue: str
) -> None:
    handle = submit(pl.failing, settings=cluster.settings(), v=3, queue=queue)
    with pytest.raises(StepFailedError):
        handle.wait(timeout_s=TIMEOUT_S)

    _wait_for_states(flower, handle.id, {"failing.explode": "FAILURE"})
    (task,) = _tasks_of(flower, handle.id).values()
    assert "ValueError: bad value 3" in task["exception"]
    assert task["worker"] == POOLS[queue]


@pytest.mark.parametrize("queue", ["cpu", "gpu"])
def test_flower_shows_a_cancelled_running_step_as_revoked(
    cluster: LightCluster, flower: FlowerServer, tmp_path: Path, queue: str
) -> None:
    handle = submit(pl.holding, settings=cluster.settings(), marker_dir=str(tmp_path), queue=queue)
    wait_for_marker(tmp_path, "pid-h")

    handle.cancel()

    # The step that was running is revoked; its successor was never sent.
    _wait_for_states(flower, handle.id, {"holding.hold": "REVOKED"})


def test_flower_never_shows_a_cached_step(cluster: LightCluster, flower: FlowerServer) -> None:
    settings = cluster.settings()
    v = time.time_ns() % 1_000_000
    first = submit(pl.cacheable, settings=settings, v=v).wait(timeout_s=TIMEOUT_S)
    cached = submit(pl.cacheable, settings=settings, v=v).wait(timeout_s=TIMEOUT_S)
    after = submit(pl.cacheable, settings=settings, v=v + 1).wait(timeout_s=TIMEOUT_S)

    assert {s.status for s in cached.steps.values()} == {"cached"}
    want = {"cacheable.square": "SUCCESS", "cacheable.square_2": "SUCCESS"}
    _wait_for_states(flower, first.id, want)
    # Flower has seen the run submitted after the cached one, and nothing of the cached one.
    _wait_for_states(flower, after.id, want)
    assert _tasks_of(flower, cached.id) == {}
