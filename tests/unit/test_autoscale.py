"""The wanted-workers formula, the pool's concurrency, the metrics collector and the step
task's store identity, without services (SQLite files, a stub broker reader)."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from scheduler import dispatch
from scheduler.metrics import SchedulerCollector, wanted_workers
from scheduler.specs import StepTask
from stores.metadata import workers as w
from stores.metadata.store import MetadataStore
from tests.pipelines import autoscale as pl
from tests.pipelines.planning import plan
from zenml_workers.errors import StoreMismatchError
from zenml_workers.settings import Settings
from zenml_workers.worker.signing import Signer

NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("ready", "running", "per_worker", "max_workers", "wanted"),
    [
        (6, 0, 1, None, 6),
        (6, 0, 4, None, 2),
        (4, 2, 2, None, 3),
        (5, 0, 2, None, 3),  # rounds up: half a worker is a worker
        (0, 0, 4, None, 0),  # no demand: scale to zero
        (100, 0, 1, 10, 10),  # bounded by --max-workers
        (3, 0, 1.5, None, 2),  # mean concurrency of mixed workers
    ],
)
def test_wanted_workers_is_ceil_of_demand_over_concurrency_bounded(
    ready: int, running: int, per_worker: float, max_workers: int | None, wanted: int
) -> None:
    assert (
        wanted_workers(ready=ready, running=running, per_worker=per_worker, max_workers=max_workers)
        == wanted
    )


def test_wanted_workers_refuses_a_non_positive_concurrency() -> None:
    with pytest.raises(ValueError, match="concurrency per worker must be positive"):
        wanted_workers(ready=1, running=0, per_worker=0)
    with pytest.raises(ValueError, match="max_workers"):
        wanted_workers(ready=1, running=0, per_worker=1, max_workers=-1)


def test_pool_concurrency_is_one_for_solo_and_the_pool_size_otherwise() -> None:
    from celery.concurrency.prefork import TaskPool as Prefork
    from celery.concurrency.solo import TaskPool as Solo

    from zenml_workers.worker.tasks import pool_concurrency

    assert pool_concurrency(SimpleNamespace(pool_cls=Solo, concurrency=16)) == 1
    assert pool_concurrency(SimpleNamespace(pool_cls=Prefork, concurrency=4)) == 4
    assert pool_concurrency(SimpleNamespace(pool_cls=Prefork, concurrency=None)) == 0


def _store(tmp_path: Path, name: str = "m.db") -> MetadataStore:
    return MetadataStore(f"sqlite:///{tmp_path / name}")


def _plan(store: MetadataStore, width: int, window: int) -> list[dispatch.QueuedStep]:
    spec = pl.held_fan.build(marker_dir="/nowhere", width=width).spec
    return plan(store, spec, window=window, now=NOW)


def _samples(collector: SchedulerCollector) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def test_collector_exports_queue_demand_totals_and_recovery_events(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _plan(store, width=6, window=2)
    with store.transaction() as s:
        w.worker_heartbeat(s, name="a@h", queues=["cpu"], host="h", pid=1, now=NOW, concurrency=4)
        w.count_takeover(s, "a@h")
    recovery: Counter[str] = Counter(requeue=2, resend=1)
    collector = SchedulerCollector(
        store,
        queues=["cpu", "gpu"],
        worker_ttl_s=10,
        broker_lengths=lambda queues: {q: 2 if q == "cpu" else 0 for q in queues},
        recovery=recovery,
        clock=lambda: NOW,
    )
    got = _samples(collector)
    assert got[("zw_metadata_store_up", ())] == 1
    assert got[("zw_queue_ready_steps", ("cpu",))] == 6
    assert got[("zw_queue_queued_steps", ("cpu",))] == 2
    assert got[("zw_queue_broker_messages", ("cpu",))] == 2
    assert got[("zw_queue_worker_slots", ("cpu",))] == 4
    assert got[("zw_queue_wanted_workers", ("cpu",))] == 2  # ceil(6 / 4)
    assert got[("zw_queue_wanted_workers", ("gpu",))] == 0
    assert got[("zw_runs_total", ("completed",))] == 0
    assert got[("zw_steps_total", ("failed",))] == 0
    assert got[("zw_recovery_events_total", ("requeue",))] == 2
    assert got[("zw_recovery_events_total", ("resend",))] == 1
    assert got[("zw_recovery_events_total", ("silent_worker",))] == 0
    assert got[("zw_worker_takeovers_total", ("a@h",))] == 1
    store.dispose()


def test_collector_answers_when_the_store_is_away(tmp_path: Path) -> None:
    unreadable = tmp_path / "not-a-db"
    unreadable.mkdir()  # a folder where the SQLite file should be: every read fails
    collector = SchedulerCollector(
        MetadataStore(f"sqlite:///{unreadable}"),
        queues=["cpu"],
        worker_ttl_s=10,
        broker_lengths=None,
        recovery=Counter(resend=3),
        clock=lambda: NOW,
    )
    got = _samples(collector)
    assert got[("zw_metadata_store_up", ())] == 0
    assert got[("zw_recovery_events_total", ("resend",))] == 3
    assert not any(name.startswith("zw_queue_") for name, _ in got)


def test_step_task_carries_its_store_inside_the_signed_body(tmp_path: Path) -> None:
    store = _store(tmp_path)
    task = _plan(store, width=1, window=2)[0].task
    assert task.store_id == store.store_id() and len(task.store_id) == 36
    assert task.store_url == store.redacted_url
    key = b"team-key"
    signer = Signer(key, [key], insecure=False)
    signed = signer.sign(task.encode())
    assert signer.refusal(signed) is None
    assert signer.refusal({**signed, "store_id": str(uuid.uuid4())}) is not None
    assert signer.refusal({**signed, "store_url": "sqlite:///elsewhere.db"}) is not None
    assert StepTask.decode(signed) == task
    store.dispose()


def test_step_task_of_an_older_client_decodes_and_is_not_checked(tmp_path: Path) -> None:
    from zenml_workers.worker.context import WorkerContext
    from zenml_workers.worker.execute import check_store

    store = _store(tmp_path)
    task = _plan(store, width=1, window=2)[0].task
    old = {k: v for k, v in task.encode().items() if k not in ("store_id", "store_url")}
    decoded = StepTask.decode(old)
    assert (decoded.store_id, decoded.store_url) == ("", "")
    assert decoded.encode() == old  # re-encoding adds nothing an older worker would not sign
    ctx = WorkerContext.from_settings(Settings(home=tmp_path / "worker-home"))
    check_store(decoded, ctx)  # nothing to compare: runs as before
    check_store(StepTask.decode({**old, "store_id": ctx.metadata.store_id()}), ctx)
    with pytest.raises(StoreMismatchError) as refused:
        check_store(task, ctx)
    sentence = str(refused.value)
    assert store.redacted_url in sentence and ctx.metadata.redacted_url in sentence
    assert task.store_id in sentence and "ZW_METADATA_URL" in sentence
    assert "\n" not in sentence
    store.dispose()
    ctx.metadata.dispose()
