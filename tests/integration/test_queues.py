"""``zw queues`` and the scheduler's metrics against a real cluster with known numbers
(issue 8, item 6): Redis, PostgreSQL, ``zw worker`` and ``zw scheduler`` processes.

A run fans out 6 steps under a broker window of 2 (``ZW_MAX_QUEUED_PER_RUN``). With no worker,
6 are ready while the broker's list holds 2, so ``LLEN`` alone would under-count the demand.
With one worker of concurrency 2, both its slots hold a step (they block until the test
releases them), 4 wait in SQL and none is on the broker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from scheduler.service import BrokerWatch
from stores.metadata import queries as q
from stores.metadata.store import MetadataStore
from tests.pipelines import autoscale as pl
from tests.services.process import (
    REPO_ROOT,
    TEST_SECRET_KEY,
    ServiceProcess,
    free_port,
    service_env,
    wait_until,
)
from zenml_workers import submit
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings

pytestmark = pytest.mark.services

REDIS_DB = 13
TIMEOUT_S = 60.0
WIDTH, WINDOW = 6, 2


@pytest.fixture()
def cluster(redis_server, postgres_server, tmp_path: Path) -> Iterator[dict[str, Any]]:
    broker = redis_server.db_url(REDIS_DB)
    client = redis.Redis.from_url(broker)
    client.flushdb()
    # The scheduler's marker, as on a broker it has watched before: without it, its first
    # pass resends every queued step and the duplicates would sit on the list beside them.
    client.set(BrokerWatch.KEY, "kept")
    client.close()
    env = {
        "ZW_BROKER_URL": broker,
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_METADATA_URL": postgres_server.create_database(f"queues_{uuid.uuid4().hex[:8]}"),
        "ZW_ARTIFACT_URI": str(tmp_path / "artifacts"),
        "ZW_HOME": str(tmp_path / "home"),
        "ZW_MAX_QUEUED_PER_RUN": str(WINDOW),
        "ZW_HEARTBEAT_INTERVAL_S": "1",
        "ZW_WORKER_TTL_S": "30",
    }
    settings = Settings(
        broker_url=broker,
        secret_key=SecretStr(TEST_SECRET_KEY),
        metadata_url=env["ZW_METADATA_URL"],
        artifact_uri=env["ZW_ARTIFACT_URI"],
        home=tmp_path / "home",
        max_queued_per_run=WINDOW,
    )
    markers = tmp_path / "markers"
    markers.mkdir()
    procs: list[ServiceProcess] = []
    try:
        yield {
            "env": env,
            "settings": settings,
            "markers": markers,
            "procs": procs,
            "dir": tmp_path,
        }
    finally:
        (markers / "release").write_text("")
        for proc in reversed(procs):
            proc.stop()
        close_stacks()


def _start(cluster: dict[str, Any], name: str, args: list[str], ready: str) -> ServiceProcess:
    proc = ServiceProcess(
        name,
        [sys.executable, "-m", "zenml_workers.cli", *args],
        log_path=cluster["dir"] / f"{name.replace(' ', '-')}.log",
        env=service_env(cluster["env"], drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
    ).start()
    cluster["procs"].append(proc)
    proc.wait_for_log(ready, TIMEOUT_S)
    return proc


def _zw_queues(cluster: dict[str, Any], *args: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "queues", "--json", *args],
        env=service_env(cluster["env"], drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return {row["queue"]: row for row in rows}


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _queue(metrics: dict[Any, float], name: str, queue: str = "cpu") -> float | None:
    return metrics.get((name, (("queue", queue),)))


def _running(metadata: MetadataStore, run_id: str) -> int:
    with metadata.read() as s:
        return sum(1 for st in q.step_runs(s, run_id) if st.status == "running")


def test_queues_counts_sql_demand_beyond_the_broker_window_then_a_worker(
    cluster: dict[str, Any],
) -> None:
    port = free_port()
    _start(cluster, "zw scheduler", ["scheduler", "--metrics-port", str(port)], "metrics on http")
    handle = submit(pl.held_fan, settings=cluster["settings"], marker_dir=str(cluster["markers"]))

    # No worker: 6 ready (2 sent to the broker, 4 waiting in SQL for the window).
    cpu = _zw_queues(cluster)["cpu"]
    assert (cpu["ready"], cpu["queued"], cpu["on_broker"], cpu["running"]) == (6, 2, 2, 0)
    assert (cpu["workers"], cpu["concurrency"]) == (0, 0)
    assert cpu["wanted"] == 6  # ceil(6 / 1): no worker reports a concurrency, --concurrency 1
    assert _zw_queues(cluster, "--concurrency", "4")["cpu"]["wanted"] == 2  # ceil(6 / 4)
    assert _zw_queues(cluster, "--max-workers", "3")["cpu"]["wanted"] == 3
    assert _zw_queues(cluster)["gpu"]["wanted"] == 0  # an idle queue scales to zero

    metrics = _scrape(port)
    assert metrics[("zw_metadata_store_up", ())] == 1
    assert _queue(metrics, "zw_queue_ready_steps") == 6
    assert _queue(metrics, "zw_queue_queued_steps") == 2
    assert _queue(metrics, "zw_queue_broker_messages") == 2
    assert _queue(metrics, "zw_queue_running_steps") == 0
    assert _queue(metrics, "zw_queue_workers") == 0
    assert _queue(metrics, "zw_queue_wanted_workers") == 6
    assert _queue(metrics, "zw_queue_wanted_workers", "gpu") == 0

    # One worker with concurrency 2: both slots busy, the window holds the rest in SQL.
    _start(cluster, "zw worker", ["worker", "-Q", "cpu", "-c", "2", "-n", "cpu@q1"], " ready.")
    metadata = MetadataStore(cluster["env"]["ZW_METADATA_URL"])
    try:
        wait_until(lambda: _running(metadata, handle.id) == 2, TIMEOUT_S, "2 running steps")
    finally:
        metadata.dispose()
    cpu = _zw_queues(cluster)["cpu"]
    assert (cpu["ready"], cpu["queued"], cpu["on_broker"], cpu["running"]) == (4, 0, 0, 2)
    assert (cpu["workers"], cpu["concurrency"]) == (1, 2)
    assert cpu["wanted"] == 3  # ceil((4 + 2) / 2), the worker's own concurrency
    metrics = _scrape(port)
    assert _queue(metrics, "zw_queue_ready_steps") == 4
    assert _queue(metrics, "zw_queue_broker_messages") == 0
    assert _queue(metrics, "zw_queue_running_steps") == 2
    assert _queue(metrics, "zw_queue_workers") == 1
    assert _queue(metrics, "zw_queue_worker_slots") == 2
    assert _queue(metrics, "zw_queue_wanted_workers") == 3

    # Released: the run completes; the totals count it, and the queue wants nobody.
    (cluster["markers"] / "release").write_text("")
    assert handle.wait(timeout_s=TIMEOUT_S, progress=False).status == "completed"
    metrics = _scrape(port)
    assert metrics[("zw_runs_total", (("status", "completed"),))] == 1
    assert metrics[("zw_runs_total", (("status", "failed"),))] == 0
    assert metrics[("zw_steps_total", (("status", "completed"),))] == WIDTH
    assert metrics[("zw_steps_total", (("status", "cancelled"),))] == 0
    assert metrics[("zw_recovery_events_total", (("kind", "requeue"),))] == 0
    assert metrics[("zw_recovery_events_total", (("kind", "resend"),))] == 0
    assert _queue(metrics, "zw_queue_wanted_workers") == 0
    assert _zw_queues(cluster)["cpu"]["wanted"] == 0


def test_scheduler_metrics_listen_on_loopback_and_refuse_a_taken_port(
    cluster: dict[str, Any],
) -> None:
    port = free_port()
    sched = _start(
        cluster, "zw scheduler", ["scheduler", "--metrics-port", str(port)], "metrics on http"
    )
    assert f"metrics on http://127.0.0.1:{port}/metrics" in sched.log_text()
    taken = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "scheduler", "--metrics-port", str(port)],
        env=service_env(cluster["env"], drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert taken.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in taken.stderr
    assert "--metrics-port" in taken.stderr
