"""Contract tests on SQLite and PostgreSQL: the store's identity, the workers' concurrency
and takeover counters (migration 0005) and the per-queue demand ``zw queues`` reads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from scheduler.metrics import queue_loads
from scheduler.specs import OutputSpec, PipelineSpec, StepSpec
from stores.metadata import attempts
from stores.metadata import queries as q
from stores.metadata import workers as w
from stores.metadata.store import HEAD_REVISION, MIGRATIONS_DIR, MetadataStore
from tests.pipelines.planning import plan

NOW = 1_000_000.0
JSON_MAT = "zenml_workers.sdk.materializers.builtins:JsonMaterializer"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meta.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture()
def store(url: str) -> Iterator[MetadataStore]:
    st = MetadataStore(url)
    yield st
    st.dispose()


def _fan(width: int, queue: str = "cpu") -> PipelineSpec:
    steps = tuple(
        StepSpec(
            invocation_id=f"s{i}",
            name="s",
            code_hash=f"sha256:c{i}",
            source_hash="sha256:src",
            outputs=(OutputSpec("output", "builtins:int", JSON_MAT),),
            queue=queue,
            enable_cache=False,
        )
        for i in range(width)
    )
    return PipelineSpec(name="fan", steps=steps, enable_cache=False)


def _plan(store: MetadataStore, spec: PipelineSpec, *, window: int, run_id: str) -> None:
    plan(store, spec, window=window, run_id=run_id, now=NOW)


def test_store_id_is_made_once_and_names_one_database(
    store: MetadataStore, url: str, tmp_path: Path
) -> None:
    again = MetadataStore(url)
    other = MetadataStore(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        assert store.store_id() == again.store_id() != ""
        with store.read() as s:
            assert store.store_id(s) == store.store_id()
        assert other.store_id() not in ("", store.store_id())
    finally:
        again.dispose()
        other.dispose()


def test_worker_heartbeat_records_concurrency_and_live_workers(store: MetadataStore) -> None:
    with store.transaction() as s:
        w.worker_heartbeat(s, name="a@h", queues=["cpu"], host="h", pid=1, now=NOW, concurrency=4)
        w.worker_heartbeat(s, name="b@h", queues=["cpu", "gpu"], host="h", pid=2, now=NOW)
        w.worker_heartbeat(s, name="old@h", queues=["cpu"], host="h", pid=3, now=NOW - 100)
    with store.transaction() as s:
        w.worker_heartbeat(
            s, name="b@h", queues=["cpu", "gpu"], host="h", pid=2, now=NOW, concurrency=2
        )
        w.worker_stopped(s, "a@h")
    with store.read() as s:
        live = w.live_workers(s, now=NOW, max_age_s=10)
    assert [(x.name, x.queues, x.concurrency) for x in live] == [("b@h", ("cpu", "gpu"), 2)]


def test_worker_takeovers_count_per_worker(store: MetadataStore) -> None:
    with store.transaction() as s:
        w.worker_heartbeat(s, name="a@h", queues=["cpu"], host="h", pid=1, now=NOW)
        w.worker_heartbeat(s, name="b@h", queues=["cpu"], host="h", pid=2, now=NOW)
    with store.transaction() as s:
        w.count_takeover(s, "a@h")
        w.count_takeover(s, "a@h")
        w.count_takeover(s, "nobody@h")  # a worker without a row: nothing to count on
    with store.read() as s:
        assert w.takeovers(s) == {"a@h": 2}


def test_queue_demand_counts_ready_queued_and_running_per_queue(store: MetadataStore) -> None:
    _plan(store, _fan(6), window=2, run_id="r1")
    _plan(store, _fan(1, queue="gpu"), window=2, run_id="r2")
    with store.autocommit() as s:
        gpu_step = q.step_runs(s, "r2")[0]
        assert attempts.claim(s, gpu_step.id, host="g@h", pid=1, lease_s=60, now=NOW) is not None
    with store.transaction() as s:
        w.worker_heartbeat(s, name="g@h", queues=["gpu"], host="h", pid=1, now=NOW, concurrency=1)
    with store.read() as s:
        demand = w.queue_demand(s)
        loads = {
            x.queue: x
            for x in queue_loads(s, now=NOW, worker_ttl_s=10, queues=["cpu", "gpu", "edge"])
        }
    assert demand["cpu"] == {"ready": 4, "queued": 2, "running": 0}
    assert demand["gpu"] == {"ready": 0, "queued": 0, "running": 1}
    cpu, gpu, edge = loads["cpu"], loads["gpu"], loads["edge"]
    assert (cpu.ready, cpu.queued, cpu.running, cpu.workers, cpu.wanted) == (6, 2, 0, 0, 6)
    assert cpu.on_broker is None  # no broker reader given
    assert (gpu.ready, gpu.running, gpu.workers, gpu.slots, gpu.wanted) == (0, 1, 1, 1, 1)
    assert (edge.ready, edge.running, edge.wanted) == (0, 0, 0)


def test_migration_0005_adds_worker_columns_to_an_existing_database(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004_step_logs")
        conn.execute(
            text(
                "INSERT INTO workers (name, queues, host, pid, started_at, heartbeat_at, stopped) "
                "VALUES ('old@h', '[\"cpu\"]', 'h', 1, 1.0, 1.0, false)"
            )
        )
    engine.dispose()

    store = MetadataStore(url)
    try:
        store.migrate()
        assert store.current_revision() == HEAD_REVISION
        columns = {c["name"] for c in inspect(store.engine).get_columns("workers")}
        assert {"concurrency", "takeovers"} <= columns
        with store.read() as s:
            live = w.live_workers(s, now=2.0, max_age_s=10)
        assert [(x.name, x.concurrency) for x in live] == [("old@h", 0)]
    finally:
        store.dispose()
