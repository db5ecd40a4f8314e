"""Single-flight on SQLite: a step whose cache key another run is computing waits for it,
is settled by that commit, and takes over when that step ends without outputs. Also: a
cache hit whose object is gone is not offered."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from scheduler import dispatch, flight, outcomes
from scheduler.recovery import RecoveryPolicy, recover
from stores.metadata import flights as fl
from stores.metadata import queries as q
from stores.metadata.models import ArtifactRow, CacheFlightRow, StepRunRow
from stores.metadata.store import MetadataStore
from tests.integration.test_metadata_store_contract import (
    NOW,
    claim,
    pipeline,
    plan,
    run_status,
    statuses,
    step,
    succeed,
)


def _chain(name: str = "p") -> Any:
    return pipeline(step("load"), step("train", inputs={"x": ["load"]}), name=name)


def _row(st: MetadataStore, run_id: str, inv: str) -> StepRunRow:
    with st.read() as s:
        return q.step_runs(s, run_id, [inv])[0]


def _outputs(st: MetadataStore, step_run_id: str) -> list[str]:
    with st.read() as s:
        return [a.id for _, _, a in q.step_artifacts(s, step_run_id, q.OUTPUT)]


def _flight_owner(st: MetadataStore, key: str) -> str | None:
    with st.read() as s:
        return s.execute(
            select(CacheFlightRow.step_run_id).where(CacheFlightRow.cache_key == key)
        ).scalar()


def test_single_flight_second_run_waits_and_is_settled_by_the_owner_commit(
    store: MetadataStore,
) -> None:
    run_a, queued_a = plan(store, _chain())
    run_b, queued_b = plan(store, _chain(), now=NOW + 1)
    owner = _row(store, run_a, "load")
    waiter = _row(store, run_b, "load")

    assert queued_b == []  # nothing of B reaches the broker
    assert statuses(store, run_b) == {"load": "waiting", "train": "pending"}
    assert waiter.waits_for == owner.id and waiter.attempt == 0 and waiter.task_id is None

    follow = succeed(store, claim(store, queued_a[0]), now=NOW + 2)

    waiter = _row(store, run_b, "load")
    assert waiter.status == "cached" and waiter.waits_for is None
    assert (waiter.cached_from_run_id, waiter.cached_from_step_run_id) == (run_a, owner.id)
    assert _outputs(store, waiter.id) == _outputs(store, owner.id)  # linked, not copied
    # Both runs' train steps now share one key: exactly one of them is sent, the other waits.
    assert follow is not None and len(follow) == 1
    trains = {run_a: _row(store, run_a, "train"), run_b: _row(store, run_b, "train")}
    computing = trains[follow[0].task.run_id]
    other = trains[run_b if computing.run_id == run_a else run_a]
    assert computing.status == "queued" and other.status == "waiting"
    assert other.waits_for == computing.id

    succeed(store, claim(store, follow[0]), now=NOW + 3)
    assert run_status(store, run_a) == run_status(store, run_b) == "completed"
    assert _row(store, other.run_id, "train").cached_from_step_run_id == computing.id


def test_single_flight_owner_failing_for_good_hands_over_to_a_waiter(
    store: MetadataStore,
) -> None:
    run_a, queued_a = plan(store, _chain())
    run_b, _ = plan(store, _chain(), now=NOW + 1)
    run_c, _ = plan(store, _chain(), now=NOW + 2)
    row = claim(store, queued_a[0])
    assert row is not None

    with store.transaction() as s:
        follow = outcomes.step_failed(
            s, row, attempt=1, error="ValueError: no", traceback="", values={}, now=NOW + 3
        )

    assert run_status(store, run_a) == "failed"
    assert follow is not None and len(follow) == 1  # the new owner's task, sent at once
    new = _row(store, follow[0].task.run_id, "load")
    rest = _row(store, run_c if new.run_id == run_b else run_b, "load")
    assert new.status == "queued" and new.waits_for is None
    assert rest.status == "waiting" and rest.waits_for == new.id
    assert _flight_owner(store, new.cache_key or "") == new.id

    succeed(store, claim(store, follow[0]), now=NOW + 4)
    assert _row(store, rest.run_id, "load").cached_from_step_run_id == new.id


def test_single_flight_owner_retrying_or_requeued_keeps_its_waiters(
    store: MetadataStore,
) -> None:
    spec = pipeline(step("load", retries=1))
    run_a, queued_a = plan(store, spec)
    run_b, _ = plan(store, spec, now=NOW + 1)
    row = claim(store, queued_a[0], lease_s=5)
    assert row is not None

    with store.transaction() as s:
        retry = outcomes.step_failed(
            s, row, attempt=1, error="ValueError: once", traceback="", values={}, now=NOW + 2
        )
    assert retry is not None and [t.task.run_id for t in retry] == [run_a]
    assert statuses(store, run_b) == {"load": "waiting"}

    row = claim(store, retry[0], now=NOW + 3, lease_s=5)
    with store.transaction() as s:
        requeued = recover(s, now=NOW + 60, policy=RecoveryPolicy())
    assert [t.task.run_id for t in requeued] == [run_a]  # the lease expired: requeued
    assert statuses(store, run_b) == {"load": "waiting"}
    assert row is not None and _row(store, run_b, "load").waits_for == row.id


def test_single_flight_owner_run_cancelled_lets_a_waiter_take_over(
    store: MetadataStore,
) -> None:
    run_a, queued_a = plan(store, _chain())
    run_b, _ = plan(store, _chain(), now=NOW + 1)
    claim(store, queued_a[0])

    with store.transaction() as s:
        outcomes.cancel_run(s, run_a, now=NOW + 2)
    assert statuses(store, run_b) == {"load": "ready", "train": "pending"}

    with store.transaction() as s:
        sent = recover(s, now=NOW + 3, policy=RecoveryPolicy())
    assert [(t.task.run_id, t.task.invocation_id) for t in sent] == [(run_b, "load")]


def test_single_flight_cancelled_waiting_run_leaves_the_owner_alone(
    store: MetadataStore,
) -> None:
    run_a, queued_a = plan(store, _chain())
    run_b, _ = plan(store, _chain(), now=NOW + 1)

    with store.transaction() as s:
        assert outcomes.cancel_run(s, run_b, now=NOW + 2) == ([], [])
    assert statuses(store, run_b) == {"load": "cancelled", "train": "cancelled"}

    follow = succeed(store, claim(store, queued_a[0]), now=NOW + 3)
    assert follow is not None and [t.task.run_id for t in follow] == [run_a]
    assert statuses(store, run_b) == {"load": "cancelled", "train": "cancelled"}


def test_single_flight_repairs_a_waiter_whose_owner_vanished(store: MetadataStore) -> None:
    run_a, _ = plan(store, _chain())
    run_b, _ = plan(store, _chain(), now=NOW + 1)
    with store.transaction() as s:  # e.g. a teammate deleted run A's rows by hand
        s.query(StepRunRow).filter(StepRunRow.run_id == run_a).delete()

    with store.transaction() as s:
        sent = recover(s, now=NOW + 2, policy=RecoveryPolicy())

    assert [(t.task.run_id, t.task.invocation_id) for t in sent] == [(run_b, "load")]
    b_load = _row(store, run_b, "load")
    assert b_load.status == "queued" and _flight_owner(store, b_load.cache_key or "") == b_load.id


def test_single_flight_stale_completed_owner_whose_outputs_are_lost_is_replaced(
    store: MetadataStore,
) -> None:
    spec = pipeline(step("load"))
    run_a, queued_a = plan(store, spec)
    succeed(store, claim(store, queued_a[0]))
    owner = _row(store, run_a, "load")
    lost = _outputs(store, owner.id)

    run_b, queued_b = plan(store, spec, now=NOW + 1)  # a hit: nothing to board
    assert statuses(store, run_b) == {"load": "cached"} and queued_b == []

    with store.transaction() as s:
        queued_c = dispatch.plan_run(
            s,
            spec=spec,
            code_blobs=[],
            run_id="run-c",
            run_name="c",
            config={},
            environment={},
            user="u",
            orchestrator="celery",
            now=NOW + 2,
            verify=lambda refs: {r.id for r in refs},  # every object is gone
        )
    computing = _row(store, "run-c", "load")
    assert [t.task.step_run_id for t in queued_c] == [computing.id]
    assert _flight_owner(store, owner.cache_key or "") == computing.id
    with store.read() as s:
        assert s.get(ArtifactRow, lost[0]).missing_at == NOW + 2  # type: ignore[union-attr]
    # Marked: the next planner needs no check to skip it.
    run_d, _ = plan(store, spec, now=NOW + 3)
    assert _row(store, run_d, "load").waits_for == computing.id


def test_single_flight_board_takes_a_hit_committed_after_the_lookup(
    store: MetadataStore,
) -> None:
    run_a, queued_a = plan(store, pipeline(step("load")))
    succeed(store, claim(store, queued_a[0]))
    key = _row(store, run_a, "load").cache_key or ""
    hit = object()

    with store.transaction() as s:
        boarded = flight.board(
            s, [flight.Wanted(key, "late", "run-late")], now=NOW, recheck=lambda keys: {key: hit}
        )
        found = fl.owners(s, [key])[key]

    assert boarded == {"late": flight.Boarded(hit=hit)}
    assert found.status == "completed"  # the row stays after its owner's commit


def test_single_flight_same_key_twice_in_one_run_computes_once(store: MetadataStore) -> None:
    twin = step("load_again")
    twin = type(twin)(**{**twin.__dict__, "name": "load", "source_hash": "sha256:src-load"})
    run_id, queued = plan(store, pipeline(step("load"), twin))

    assert len(queued) == 1
    assert statuses(store, run_id) == {"load": "queued", "load_again": "waiting"}
    succeed(store, claim(store, queued[0]))
    assert statuses(store, run_id) == {"load": "completed", "load_again": "cached"}
    assert run_status(store, run_id) == "completed"


def test_single_flight_skips_embedded_runs(store: MetadataStore) -> None:
    from tests.pipelines.planning import plan as plan_as

    spec = _chain()
    first = plan_as(store, spec, now=NOW, orchestrator="local")
    second = plan_as(store, spec, now=NOW + 1, orchestrator="local")

    assert len(first) == len(second) == 1  # each local run computes on its own


def test_cache_hit_with_a_lost_object_is_not_offered(store: MetadataStore) -> None:
    spec = pipeline(step("load"))
    _, queued = plan(store, spec)
    succeed(store, claim(store, queued[0]))

    with store.transaction() as s:
        intact = dispatch.plan_run(
            s,
            spec=spec,
            code_blobs=[],
            run_id="intact",
            run_name="intact",
            config={},
            environment={},
            user="u",
            orchestrator="celery",
            now=NOW + 1,
            verify=lambda refs: set(),
        )
    assert intact == [] and statuses(store, "intact") == {"load": "cached"}


def test_single_flight_progress_names_the_step_a_waiting_step_waits_for() -> None:
    from zenml_workers.sdk.progress import Snapshot, StepState, count_statuses, wait_reasons

    snap = Snapshot(
        run_id="r-mine",
        pipeline="p",
        status="running",
        steps=(
            StepState("load", "waiting", "cpu", waits_for=("a1b2c3d4e5", "load")),
            StepState("train", "pending", "cpu"),
        ),
        elapsed_s=1.0,
        workers=(),
        local_workers=0,
        window=64,
    )

    assert count_statuses(st.status for st in snap.steps) == {"waiting": 1, "pending": 1}
    assert wait_reasons(snap) == [
        "step load waits for run a1b2c3d4 step load (same cache key): it reuses that step's "
        "outputs when it commits"
    ]


def test_cache_hit_check_looks_up_only_the_objects_this_run_reads(store: MetadataStore) -> None:
    spec = _chain()
    _, queued = plan(store, spec)
    follow = succeed(store, claim(store, queued[0]), value_hash="sha256:rows")
    assert follow is not None
    first_train = claim(store, follow[0])
    assert first_train is not None
    succeed(store, first_train, value_hash="sha256:model")
    asked: list[list[str]] = []

    def verify(refs: Any) -> set[str]:
        asked.append([r.content_hash for r in refs])
        return {r.id for r in refs if r.content_hash == "sha256:model"}  # the model is gone

    with store.transaction() as s:
        queued = dispatch.plan_run(
            s,
            spec=spec,
            code_blobs=[],
            run_id="again",
            run_name="again",
            config={},
            environment={},
            user="u",
            orchestrator="celery",
            now=NOW + 5,
            verify=verify,
        )

    # First the leaf's output only (load's feeds a cached step); then, train being no hit,
    # the load output it will read.
    assert asked == [["sha256:model"], ["sha256:rows"]]
    assert statuses(store, "again") == {"load": "cached", "train": "queued"}
    assert [t.task.invocation_id for t in queued] == ["train"]
