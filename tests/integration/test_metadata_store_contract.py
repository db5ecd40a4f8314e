"""One contract suite for the metadata store, run against SQLite and a real PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from scheduler import decisions, dispatch, outcomes
from scheduler.recovery import RecoveryPolicy, recover
from scheduler.specs import InputRef, InputSpec, OutputSpec, PipelineSpec, StepSpec
from stores.errors import MetadataStoreError, NotFoundError
from stores.metadata import attempts
from stores.metadata import queries as q
from stores.metadata import workers as w
from stores.metadata.models import ArtifactRow, LineageRow, RunRow, StepRunRow
from stores.metadata.store import HEAD_REVISION, MetadataStore

NOW = 1_000_000.0
JSON_MAT = "zenml_workers.sdk.materializers.builtins:JsonMaterializer"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[MetadataStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'meta.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    st = MetadataStore(url)
    yield st
    st.dispose()


def _code(inv: str) -> bytes:
    return f"code of {inv}".encode()


def _code_hash(inv: str) -> str:
    return "sha256:" + hashlib.sha256(_code(inv)).hexdigest()


def step(
    inv: str,
    *,
    ups: tuple[str, ...] = (),
    inputs: dict[str, list[str]] | None = None,
    retries: int = 0,
    cache: bool = True,
    outputs: tuple[str, ...] = ("output",),
) -> StepSpec:
    ins = tuple(
        InputSpec(name=n, refs=tuple(InputRef(u, "output") for u in us), is_list=len(us) > 1)
        for n, us in (inputs or {}).items()
    )
    upstream = tuple(sorted(set(ups) | {r.step for i in ins for r in i.refs}))
    return StepSpec(
        invocation_id=inv,
        name=inv.split("_")[0],
        code_hash=_code_hash(inv),
        source_hash=f"sha256:src-{inv}",
        inputs=ins,
        upstream=upstream,
        outputs=tuple(OutputSpec(o, "builtins:int", JSON_MAT) for o in outputs),
        retries=retries,
        enable_cache=cache,
    )


def pipeline(*steps: StepSpec, name: str = "p") -> PipelineSpec:
    return PipelineSpec(name=name, steps=steps)


def plan(
    st: MetadataStore, spec: PipelineSpec, *, window: int = 64, now: float = NOW
) -> tuple[str, list[Any]]:
    run_id = str(uuid.uuid4())
    blobs = [
        {"code_hash": s.code_hash, "name": s.name, "source": "", "pickled": _code(s.invocation_id)}
        for s in spec.steps
    ]
    with st.transaction() as s:
        queued = dispatch.plan_run(
            s,
            spec=spec,
            code_blobs=blobs,
            run_id=run_id,
            run_name=f"r-{run_id[:6]}",
            config={},
            environment={},
            user="u",
            orchestrator="test",
            window=window,
            now=now,
        )
    return run_id, queued


def claim(
    st: MetadataStore, queued: Any, *, now: float = NOW, lease_s: float = 60.0
) -> StepRunRow | None:
    with st.transaction() as s:
        return attempts.claim(s, queued.task.step_run_id, host="h", pid=1, lease_s=lease_s, now=now)


def succeed(
    st: MetadataStore,
    row: StepRunRow,
    value_hash: str = "sha256:v",
    *,
    window: int = 64,
    now: float = NOW,
) -> list[Any] | None:
    art_id = q.new_id()
    with st.transaction() as s:
        _, by_id, _ = dispatch.SPECS.get(s, row.run_id)
        artifacts = (
            [
                {
                    "id": art_id,
                    "name": "output",
                    "uri": f"memory://t/{art_id}",
                    "data_type": "builtins:int",
                    "materializer": JSON_MAT,
                    "content_hash": value_hash,
                    "size_bytes": 1,
                    "artifact_metadata": {},
                    "producer_run_id": row.run_id,
                    "producer_step_run_id": row.id,
                    "created_at": now,
                }
            ]
            if by_id[row.invocation_id].outputs
            else []
        )
        up = {r.step for i in by_id[row.invocation_id].inputs for r in i.refs}
        produced = q.output_artifacts(s, row.run_id, up)
        edges = (
            [
                {
                    "step_run_id": row.id,
                    "direction": "output",
                    "name": "output",
                    "position": 0,
                    "artifact_id": art_id,
                    "run_id": row.run_id,
                }
            ]
            if artifacts
            else []
        )
        edges += decisions.input_edges(by_id[row.invocation_id], row.id, row.run_id, produced)
        return outcomes.step_succeeded(
            s,
            row,
            attempt=row.attempt,
            artifacts=artifacts,
            edges=edges,
            values={},
            window=window,
            now=now,
        )


def statuses(st: MetadataStore, run_id: str) -> dict[str, str]:
    with st.read() as s:
        return {r.invocation_id: r.status for r in q.step_runs(s, run_id)}


def run_status(st: MetadataStore, run_id: str) -> str:
    with st.read() as s:
        return q.get_run(s, run_id).status


def drive(st: MetadataStore, queued: list[Any], **kw: Any) -> None:
    """Run every queued step to success, breadth first."""
    while queued:
        nxt = []
        for item in queued:
            row = claim(st, item)
            assert row is not None
            nxt += succeed(st, row, **kw) or []
        queued = nxt


def test_store_migrates_once_and_then_skips(store: MetadataStore) -> None:
    with store.read() as s:
        assert s.execute(select(func.count()).select_from(RunRow)).scalar_one() == 0
    assert store.current_revision() == HEAD_REVISION
    again = MetadataStore(store.url)
    again.migrate()
    assert again.current_revision() == HEAD_REVISION
    again.dispose()


def test_plan_run_queues_roots_and_leaves_the_rest_pending(store: MetadataStore) -> None:
    spec = pipeline(step("a"), step("b", inputs={"x": ["a"]}), step("c", ups=("a",)))
    run_id, queued = plan(store, spec)

    assert [x.task.invocation_id for x in queued] == ["a"]
    assert statuses(store, run_id) == {"a": "queued", "b": "pending", "c": "pending"}
    assert run_status(store, run_id) == "running"


def test_claim_is_exclusive_and_refused_after_cancel(store: MetadataStore) -> None:
    run_id, queued = plan(store, pipeline(step("a"), step("b")))
    first = claim(store, queued[0])
    assert first is not None and first.attempt == 1
    assert claim(store, queued[0]) is None

    with store.transaction() as s:
        queued_ids, running_ids = outcomes.cancel_run(s, run_id, now=NOW)
    assert running_ids == [queued[0].task_id] and queued_ids == [queued[1].task_id]
    assert claim(store, queued[1]) is None
    assert statuses(store, run_id) == {"a": "cancelled", "b": "cancelled"}
    assert succeed(store, first) is None  # the cancelled attempt cannot commit


def test_success_commits_lineage_and_completes_the_run(store: MetadataStore) -> None:
    spec = pipeline(step("a"), step("b", inputs={"x": ["a"]}))
    run_id, queued = plan(store, spec)
    drive(store, queued)

    assert statuses(store, run_id) == {"a": "completed", "b": "completed"}
    assert run_status(store, run_id) == "completed"
    with store.read() as s:
        b = q.step_runs(s, run_id, ["b"])[0]
        ((name, _, art),) = q.step_artifacts(s, b.id, q.INPUT)
        a_out = q.output_artifacts(s, run_id, ["a"])[("a", "output")]
    assert (name, art.id) == ("x", a_out.id)


def test_lost_lease_commits_nothing(store: MetadataStore) -> None:
    run_id, queued = plan(store, pipeline(step("a")))
    row = claim(store, queued[0])
    assert row is not None
    stale = StepRunRow(**{c.name: getattr(row, c.name) for c in StepRunRow.__table__.columns})
    stale.attempt = row.attempt + 1

    assert succeed(store, stale) is None
    with store.read() as s:
        assert s.execute(select(func.count()).select_from(ArtifactRow)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(LineageRow)).scalar_one() == 0
    assert statuses(store, run_id) == {"a": "running"}


def test_rerun_is_fully_cached_and_links_the_same_artifacts(store: MetadataStore) -> None:
    spec = pipeline(step("a"), step("b", inputs={"x": ["a"]}), step("c", inputs={"y": ["b"]}))
    first, queued = plan(store, spec)
    drive(store, queued)

    second, queued = plan(store, spec, now=NOW + 10)

    assert queued == []
    assert statuses(store, second) == {"a": "cached", "b": "cached", "c": "cached"}
    assert run_status(store, second) == "completed"
    with store.read() as s:
        old = q.output_artifacts(s, first, ["a", "b", "c"])
        new = q.output_artifacts(s, second, ["a", "b", "c"])
        rows = q.step_runs(s, second)
    assert {k: v.id for k, v in old.items()} == {k: v.id for k, v in new.items()}
    assert {r.cached_from_run_id for r in rows} == {first}


def test_byte_identical_upstream_keeps_downstream_cached(store: MetadataStore) -> None:
    spec = pipeline(step("a", cache=False), step("b", inputs={"x": ["a"]}))
    first, queued = plan(store, spec)
    drive(store, queued, value_hash="sha256:same")

    second, queued = plan(store, spec, now=NOW + 10)
    assert [x.task.invocation_id for x in queued] == ["a"]
    drive(store, queued, value_hash="sha256:same")

    assert statuses(store, second) == {"a": "completed", "b": "cached"}


def test_failure_retries_then_fails_the_run_and_skips_the_rest(store: MetadataStore) -> None:
    run_id, queued = plan(store, pipeline(step("a", retries=1), step("b", inputs={"x": ["a"]})))
    row = claim(store, queued[0])
    assert row is not None
    with store.transaction() as s:
        retry = outcomes.step_failed(
            s, row, attempt=1, error="E: 1", traceback="tb1", values={}, now=NOW
        )
    assert retry is not None and [x.task.invocation_id for x in retry] == ["a"]
    row = claim(store, retry[0])
    assert row is not None and row.attempt == 2
    with store.transaction() as s:
        assert (
            outcomes.step_failed(
                s, row, attempt=2, error="E: 2", traceback="tb2", values={}, now=NOW
            )
            == []
        )

    assert statuses(store, run_id) == {"a": "failed", "b": "skipped"}
    with store.read() as s:
        run = q.get_run(s, run_id)
        a = q.step_runs(s, run_id, ["a"])[0]
    assert run.status == "failed" and "E: 2" in run.message
    assert (a.exception, a.traceback) == ("E: 2", "tb2")


def test_window_limits_steps_on_the_broker_and_tops_up(store: MetadataStore) -> None:
    spec = pipeline(*(step(f"w_{i}") for i in range(10)))
    run_id, queued = plan(store, spec, window=3)
    assert len(queued) == 3
    row = claim(store, queued[0])
    assert row is not None

    more = succeed(store, row, window=3)

    assert more is not None and len(more) == 1
    counts = statuses(store, run_id)
    assert sum(v == "queued" for v in counts.values()) == 3
    assert sum(v == "ready" for v in counts.values()) == 6


def test_recovery_requeues_expired_leases_then_gives_up(store: MetadataStore) -> None:
    run_id, queued = plan(store, pipeline(step("a")))
    assert claim(store, queued[0], lease_s=10) is not None
    with store.transaction() as s:
        assert recover(s, now=NOW + 5, policy=RecoveryPolicy()) == []
    with store.transaction() as s:
        again = recover(s, now=NOW + 11, policy=RecoveryPolicy())
    assert [x.task.invocation_id for x in again] == ["a"]
    assert claim(store, again[0], now=NOW + 12, lease_s=10) is not None
    with store.transaction() as s:  # a second lost worker is tolerated too
        third = recover(s, now=NOW + 23, policy=RecoveryPolicy())
    assert [x.task_id for x in third] == [q.task_id(third[0].task.step_run_id, 3)]
    assert claim(store, third[0], now=NOW + 24, lease_s=10) is not None
    with store.transaction() as s:
        assert recover(s, now=NOW + 40, policy=RecoveryPolicy()) == []
    assert statuses(store, run_id) == {"a": "failed"}
    assert run_status(store, run_id) == "failed"


def test_recovery_resends_stale_queued_steps(store: MetadataStore) -> None:
    _, queued = plan(store, pipeline(step("a")))
    policy = RecoveryPolicy(requeue_queued_after_s=100)
    with store.transaction() as s:
        assert recover(s, now=NOW + 50, policy=policy) == []
    with store.transaction() as s:
        resent = recover(s, now=NOW + 101, policy=policy)
    assert [x.task_id for x in resent] == [queued[0].task_id]


def test_concurrent_finishers_queue_a_join_exactly_once(store: MetadataStore) -> None:
    spec = pipeline(step("l"), step("r"), step("j", inputs={"x": ["l", "r"]}))
    run_id, queued = plan(store, spec)
    rows = [claim(store, x) for x in queued]
    barrier = threading.Barrier(2)
    results: list[list[Any] | None] = []

    def finish(row: StepRunRow) -> None:
        barrier.wait()
        results.append(succeed(store, row))

    threads = [threading.Thread(target=finish, args=(r,)) for r in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    follow = [x.task.invocation_id for r in results for x in (r or [])]
    assert follow == ["j"]
    assert statuses(store, run_id)["j"] == "queued"


def test_a_failed_transaction_leaves_no_rows(store: MetadataStore) -> None:
    with pytest.raises(RuntimeError), store.transaction() as s:
        dispatch.plan_run(
            s,
            spec=pipeline(step("a")),
            code_blobs=[],
            run_id=str(uuid.uuid4()),
            run_name="x",
            config={},
            environment={},
            user="u",
            orchestrator="t",
            now=NOW,
        )
        raise RuntimeError("crash after planning")
    with store.read() as s:
        assert s.execute(select(func.count()).select_from(RunRow)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(StepRunRow)).scalar_one() == 0


def test_missing_rows_raise_not_found(store: MetadataStore) -> None:
    with store.read() as s, pytest.raises(NotFoundError, match="zw runs"):
        q.get_run(s, "nope")


def test_bad_urls_give_one_sentence(tmp_path) -> None:
    with pytest.raises(MetadataStoreError, match="ZW_METADATA_URL"):
        MetadataStore("nosuchdriver://x/y").migrate()
    unreachable = MetadataStore("postgresql+psycopg://postgres@127.0.0.1:1/zw")
    with (
        pytest.raises(MetadataStoreError, match="cannot reach the metadata store.*ZW_METADATA_URL"),
        unreachable.read(),
    ):
        pass


def test_worker_heartbeats_define_live_queues(store: MetadataStore) -> None:
    with store.transaction() as s:
        w.worker_heartbeat(s, name="w1", queues=["cpu"], host="h", pid=1, now=NOW)
        w.worker_heartbeat(s, name="w2", queues=["gpu"], host="h", pid=2, now=NOW - 100)
    with store.read() as s:
        assert w.live_queues(s, now=NOW, max_age_s=60) == {"cpu"}
    with store.transaction() as s:
        w.worker_stopped(s, "w1")
    with store.read() as s:
        assert w.live_queues(s, now=NOW, max_age_s=60) == set()


def test_concurrent_last_steps_close_the_run_exactly_once(store: MetadataStore) -> None:
    # The last two steps commit at once. Under READ COMMITTED each used to see the other as still
    # running, so neither closed the run. Here the first holds its transaction open while the
    # second commits (or blocks, as it must, on the run row) before the first commits.
    run_id, queued = plan(store, pipeline(step("l"), step("r")))
    first, second = (claim(store, x) for x in queued)
    assert first is not None and second is not None
    first_counted, second_done = threading.Event(), threading.Event()

    def finish_first() -> None:
        with store.transaction() as s:
            outcomes.step_succeeded(s, first, attempt=1, artifacts=[], edges=[], values={}, now=NOW)
            first_counted.set()
            second_done.wait(1.0)  # returns False when the second is (correctly) blocked

    def finish_second() -> None:
        first_counted.wait(30)
        with store.transaction() as s:
            outcomes.step_succeeded(
                s, second, attempt=1, artifacts=[], edges=[], values={}, now=NOW
            )
        second_done.set()

    threads = [threading.Thread(target=finish_first), threading.Thread(target=finish_second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert statuses(store, run_id) == {"l": "completed", "r": "completed"}
    assert run_status(store, run_id) == "completed"


# -- faults: idle connections, dead lease holders, silent workers, a broker that lost queues --


def test_claim_after_the_connection_idled_past_the_ping_threshold(store: MetadataStore) -> None:
    """Regression: the idle ping left psycopg in a transaction, so the next autocommit claim
    failed with "can't change 'autocommit' now" and the step was stranded."""
    idle = MetadataStore(store.url, idle_ping_s=0.3)
    try:
        _, queued = plan(idle, pipeline(step("a"), step("b")))
        with idle.read() as s:  # the pooled connection is used, then idles
            q.status_counts(s, queued[0].task.run_id)
        time.sleep(0.6)  # the fault itself: real idle time past the threshold
        with idle.autocommit() as s:
            row = attempts.claim(
                s, queued[0].task.step_run_id, host="h", pid=1, lease_s=60, now=NOW
            )
        time.sleep(0.6)
        with idle.transaction() as s:  # and a write transaction after idling works too
            other = attempts.claim(
                s, queued[1].task.step_run_id, host="h", pid=1, lease_s=60, now=NOW
            )
    finally:
        idle.dispose()
    assert row is not None and row.status == "running"
    assert other is not None


def test_take_over_replaces_the_dead_attempt_exactly_once(store: MetadataStore) -> None:
    run_id, queued = plan(store, pipeline(step("a")))
    first = claim(store, queued[0])
    assert first is not None
    sid = queued[0].task.step_run_id

    with store.transaction() as s:
        new = attempts.take_over(
            s, sid, first.attempt, host="h", pid=2, lease_s=60, now=NOW + 1, reason="pid 1 died"
        )
        again = attempts.take_over(
            s, sid, first.attempt, host="h", pid=3, lease_s=60, now=NOW + 1, reason="pid 1 died"
        )
    assert new is not None and new.attempt == 2 and new.worker_pid == 2
    assert again is None
    # The dead attempt can no longer commit; the new one can.
    assert succeed(store, first) is None
    assert succeed(store, new) == []
    assert run_status(store, run_id) == "completed"


def test_recovery_expires_leases_of_a_silent_worker_at_once(store: MetadataStore) -> None:
    _, queued = plan(store, pipeline(step("a")))
    with store.transaction() as s:
        w.worker_heartbeat(s, name="cpu@vm1", queues=["cpu"], host="vm1", pid=9, now=NOW)
        row = attempts.claim(
            s, queued[0].task.step_run_id, host="cpu@vm1", pid=10, lease_s=120, now=NOW
        )
    assert row is not None
    policy = RecoveryPolicy()

    with store.transaction() as s:  # silent for 11 s, but the observer only just started
        assert recover(s, now=NOW + 11, policy=policy) == []
    with store.transaction() as s:
        requeued = recover(s, now=NOW + 11, policy=policy, judge_heartbeats=True)

    assert [x.task_id for x in requeued] == [q.task_id(row.id, 2)]


def test_a_worker_hands_back_leases_of_its_dead_pool_processes(store: MetadataStore) -> None:
    _, queued = plan(store, pipeline(step("a"), step("b"), step("c")))
    with store.transaction() as s:
        for qs, pid, started in (
            (queued[0], 101, NOW),
            (queued[1], 102, NOW),
            (queued[2], 103, NOW + 5),
        ):
            attempts.claim(s, qs.task.step_run_id, host="cpu@vm", pid=pid, lease_s=120, now=started)
        # 101 died; 103 claimed after the process listing was taken.
        n = w.expire_orphaned_leases(s, "cpu@vm", alive={100, 102}, seen_at=NOW + 2)
    assert n == 1
    with store.transaction() as s:
        requeued = recover(s, now=NOW + 2, policy=RecoveryPolicy())
    assert [x.task.invocation_id for x in requeued] == ["a"]


def test_recovery_spares_a_worker_that_is_still_beating(store: MetadataStore) -> None:
    _, queued = plan(store, pipeline(step("a")))
    with store.transaction() as s:
        w.worker_heartbeat(s, name="cpu@vm1", queues=["cpu"], host="vm1", pid=9, now=NOW + 8)
        attempts.claim(s, queued[0].task.step_run_id, host="cpu@vm1", pid=10, lease_s=120, now=NOW)
    with store.transaction() as s:
        assert recover(s, now=NOW + 11, policy=RecoveryPolicy(), judge_heartbeats=True) == []


def test_a_restarted_worker_expires_only_its_previous_process_leases(store: MetadataStore) -> None:
    _, queued = plan(store, pipeline(step("a"), step("b")))
    old = claim(store, queued[0], now=NOW)
    with store.transaction() as s:
        attempts.claim(s, queued[0].task.step_run_id, host="h", pid=1, lease_s=60, now=NOW)
        new = attempts.claim(
            s, queued[1].task.step_run_id, host="h", pid=5, lease_s=60, now=NOW + 20
        )
        n = w.expire_leases_held_by(s, ["h"], NOW + 21, started_before=NOW + 10)
    assert old is not None and new is not None and n == 1
    with store.transaction() as s:
        requeued = recover(s, now=NOW + 21, policy=RecoveryPolicy())
    assert [x.task.invocation_id for x in requeued] == ["a"]


def test_recovery_resends_unsent_and_all_queued_after_a_broker_loss(store: MetadataStore) -> None:
    _, queued = plan(store, pipeline(step("a"), step("b")))
    policy = RecoveryPolicy(requeue_queued_after_s=600)
    with store.transaction() as s:
        q.mark_unsent(s, [queued[0].task.step_run_id])
    with store.transaction() as s:
        unsent = recover(s, now=NOW + 1, policy=policy)
    assert [x.task_id for x in unsent] == [queued[0].task_id]
    with store.transaction() as s:
        everything = recover(s, now=NOW + 2, policy=policy, resend_all_queued=True)
    assert sorted(x.task_id for x in everything) == sorted(x.task_id for x in queued)


def test_recovery_resends_steps_the_broker_lost(store: MetadataStore) -> None:
    _, queued = plan(store, pipeline(step("a"), step("b")))
    lost = queued[0].task.step_run_id
    with store.transaction() as s:
        resent = recover(s, now=NOW + 1, policy=RecoveryPolicy(), resend=[lost, "no-such-step"])
    assert [x.task_id for x in resent] == [queued[0].task_id]


def test_a_completed_run_drops_its_waiting_message(store: MetadataStore) -> None:
    run_id, queued = plan(store, pipeline(step("a")))
    with store.transaction() as s:
        q.set_run_message(s, run_id, "steps wait on queue 'cpu', which no live worker consumes")
    row = claim(store, queued[0])
    assert row is not None
    succeed(store, row)
    with store.read() as s:
        assert q.get_run(s, run_id).message == ""


def test_unreachable_postgres_is_an_infrastructure_error() -> None:
    from stores.errors import InfrastructureError
    from tests.services.process import free_port

    st = MetadataStore(f"postgresql+psycopg://u:secret@127.0.0.1:{free_port()}/zw")
    with (
        pytest.raises(InfrastructureError, match="cannot reach the metadata store") as info,
        st.transaction(),
    ):
        pass
    assert "secret" not in str(info.value)


def test_sqlite_locked_and_full_get_their_own_sentences(tmp_path) -> None:
    from sqlalchemy.exc import OperationalError

    st = MetadataStore(f"sqlite:///{tmp_path / 'm.db'}")
    locked = st._unreachable(OperationalError("stmt", {}, Exception("database is locked")))
    full = st._unreachable(OperationalError("stmt", {}, Exception("database or disk is full")))
    assert "stayed locked by another process" in str(locked)
    assert "is full" in str(full) and "free space" in str(full)
    assert "check that the database is running" not in str(locked) + str(full)


def test_code_blobs_are_keyed_by_content(store: MetadataStore) -> None:
    """A writer cannot store other bytes under a hash and so poison it for later runs."""
    forged = {"code_hash": _code_hash("a"), "name": "a", "source": "", "pickled": b"evil"}
    with pytest.raises(MetadataStoreError, match="hashes to sha256:"), store.transaction() as s:
        q.put_code_blobs(s, [forged], NOW)
    with store.read() as s, pytest.raises(NotFoundError):
        q.get_code_blob(s, _code_hash("a"))
