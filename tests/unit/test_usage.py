"""What a run cost: the usage record, measuring, ``--since`` parsing and the sums per group."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scheduler.specs import StepSpec
from stores.metadata.models import PipelineRow, RunRow, StepRunRow
from stores.metadata.store import MetadataStore
from stores.metadata.usage import (
    USAGE_KEY,
    UsageRecord,
    records_of,
    usage_by,
)
from stores.periods import parse_period
from zenml_workers.cli.usage import WIDTH, seconds_text, usage_lines
from zenml_workers.sdk.client import _period_start
from zenml_workers.sdk.resources import RunCost, StepCost, UsageRow
from zenml_workers.worker.usage import StepMeter, asks_for_gpu, visible_gpus

NOW = 1_700_000_000.0

# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800.0),
        ("12h", 43_200.0),
        ("7d", 604_800.0),
        ("45s", 45.0),
        ("2w", 1_209_600.0),
        ("1.5h", 5400.0),
        (" 7D ", 604_800.0),
    ],
)
def test_parse_period_reads_a_number_and_a_unit(text: str, seconds: float) -> None:
    assert parse_period(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "0h", "7y", "7 days", "1h30m"])
def test_parse_period_refuses_what_it_cannot_read_and_names_the_fix(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 30m, 12h or 7d"):
        parse_period(text)


def test_period_start_takes_text_timedelta_or_datetime() -> None:
    assert _period_start("12h", NOW) == NOW - 43_200
    assert _period_start(timedelta(minutes=30), NOW) == NOW - 1800
    aware = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert _period_start(aware, NOW) == aware.timestamp()
    assert _period_start(aware.replace(tzinfo=None), NOW) == aware.timestamp()  # naive is UTC
    with pytest.raises(ValueError, match="not understood"):
        _period_start(3600, NOW)  # type: ignore[arg-type]


# -- the record -----------------------------------------------------------------------------


def test_usage_record_adds_attempts_and_keeps_the_latest() -> None:
    first = UsageRecord().then(wall_s=0.5, cpu_s=0.25, gpus=("0", "1"))
    second = first.then(wall_s=1.2345674, cpu_s=1.0000004, gpus=("0", "1"))

    assert (first.wall_s, first.gpu_s, first.attempts) == (0.5, 1.0, 1)
    assert (second.wall_s, second.cpu_s) == (1.234567, 1.0)  # microseconds
    assert second.gpu_s == 2 * second.wall_s
    assert second.attempts == 2
    assert second.total_wall_s == 1.734567
    assert second.total_cpu_s == 1.25
    assert second.total_gpu_s == round(1.0 + 2 * 1.234567, 6)
    assert UsageRecord.decode(second.encode()) == second
    assert UsageRecord.of({USAGE_KEY: second.encode(), "duration_s": 2.0}) == second
    assert UsageRecord.of({"duration_s": 2.0}) is None
    assert UsageRecord.of(None) is None


def test_usage_record_without_gpus_has_no_gpu_seconds() -> None:
    record = UsageRecord().then(wall_s=3.0, cpu_s=2.0, gpus=())
    assert (record.gpu_s, record.total_gpu_s, record.gpus) == (0.0, 0.0, ())


@pytest.mark.parametrize(
    ("value", "gpus"),
    [
        (None, ()),
        ("", ()),
        ("0,1", ("0", "1")),
        (" 0 , 1 ", ("0", "1")),
        ("-1", ()),
        ("0,-1,2", ("0",)),
        ("1,1,2", ("1", "2")),
        ("GPU-8f2c,MIG-1a2b", ("GPU-8f2c", "MIG-1a2b")),
        ("NoDevFiles", ()),
    ],
)
def test_visible_gpus_reads_cuda_visible_devices_as_cuda_does(
    value: str | None, gpus: tuple[str, ...]
) -> None:
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert visible_gpus(env) == gpus


def _spec(**kw: Any) -> StepSpec:
    return replace(StepSpec(invocation_id="s", name="s", code_hash="h", source_hash="h"), **kw)


def test_only_steps_asking_for_a_gpu_hold_the_workers_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert asks_for_gpu(_spec(queue="gpu"))
    assert asks_for_gpu(_spec(queue="a100", step_type="trainer"))
    assert asks_for_gpu(_spec(settings={"resources": {"cpu": None, "gpu": 1, "memory": None}}))
    assert not asks_for_gpu(_spec(settings={"resources": {"cpu": 2.0, "gpu": 0}}))
    assert not asks_for_gpu(_spec())
    assert StepMeter.for_step(_spec(queue="gpu")).gpus == ("0", "1")
    assert StepMeter.for_step(_spec()).gpus == ()


# -- measuring ------------------------------------------------------------------------------


def _burn() -> int:
    return sum(i * i % 7 for i in range(200_000))


def test_meter_measures_the_call_even_when_it_raises() -> None:
    meter = StepMeter(("0", "1"))
    with pytest.raises(RuntimeError), meter.measuring():
        _burn()
        raise RuntimeError("the step failed")

    assert meter.wall_s > 0 and meter.cpu_s > 0
    assert meter.cpu_scope == "process"
    record = meter.record(None)
    assert record.gpus == ("0", "1") and record.gpu_s == 2 * record.wall_s


def test_meter_adds_its_attempt_to_the_earlier_ones_and_keeps_duration() -> None:
    earlier = UsageRecord().then(wall_s=4.0, cpu_s=3.0, gpus=("0",))
    meter = StepMeter(("0",))
    with meter.measuring():
        _burn()
    values: dict[str, Any] = {"logs": "", "step_metadata": {"duration_s": 9.5}}

    meter.add_to(values, earlier={"duration_s": 8.0, USAGE_KEY: earlier.encode()})

    record = UsageRecord.of(values["step_metadata"])
    assert record is not None and values["step_metadata"]["duration_s"] == 9.5
    assert record.attempts == 2
    assert record.total_wall_s == round(4.0 + record.wall_s, 6)
    assert record.total_gpu_s == round(4.0 + record.gpu_s, 6)


def test_meter_of_steps_overlapping_in_one_process_counts_each_threads_own_time() -> None:
    inside, done = threading.Event(), threading.Event()
    first, second = StepMeter(), StepMeter()

    def long_step() -> None:
        with first.measuring():
            inside.set()
            assert done.wait(30)

    worker = threading.Thread(target=long_step)
    worker.start()
    assert inside.wait(30)
    with second.measuring():
        _burn()
    done.set()
    worker.join(30)

    assert (first.cpu_scope, second.cpu_scope) == ("thread", "thread")
    assert second.cpu_s > 0
    alone = StepMeter()
    with alone.measuring():
        pass
    assert alone.cpu_scope == "process"


# -- a run's cost and the report ------------------------------------------------------------


def test_step_cost_of_a_cache_hit_is_its_originals_final_attempt_as_saved() -> None:
    original = UsageRecord().then(wall_s=1.0, cpu_s=0.5, gpus=("0",))
    original = original.then(wall_s=2.0, cpu_s=1.5, gpus=("0", "1"))
    hit = StepCost.from_records(None, original)
    ran = StepCost.from_records(original)

    assert (hit.saved_wall_s, hit.saved_cpu_s, hit.saved_gpu_s) == (2.0, 1.5, 4.0)
    assert (hit.total_cpu_s, hit.attempts, hit.measured) == (0.0, 0, True)
    assert (ran.cpu_s, ran.total_cpu_s, ran.gpus, ran.gpu_s, ran.total_gpu_s) == (
        1.5,
        2.0,
        ("0", "1"),
        4.0,
        5.0,
    )
    assert StepCost.from_records(None) == StepCost()
    assert RunCost.of([hit, ran, StepCost()]) == RunCost(
        wall_s=3.0, cpu_s=2.0, gpu_s=5.0, saved_wall_s=2.0, saved_cpu_s=1.5, saved_gpu_s=4.0
    )


def _row(key: str, **kw: Any) -> UsageRow:
    base: dict[str, Any] = dict(
        runs=1,
        steps=2,
        cached_steps=1,
        wall_s=1.0,
        cpu_s=0.5,
        gpu_s=2.0,
        saved_wall_s=0.0,
        saved_cpu_s=0.25,
        saved_gpu_s=1.0,
    )
    return UsageRow(key=key, **(base | kw))


def test_usage_lines_show_every_number_with_a_total_within_100_columns() -> None:
    rows = [
        _row("alice", cpu_s=12.3456789, gpu_s=7_200_000.5),
        _row("a-very-long-user-name-from-ldap@example.com", cpu_s=3.0, gpu_s=9.9e11),
    ]
    lines = usage_lines(rows, by="user", since="7d", start=NOW)

    assert lines[0] == "usage since 2023-11-14 22:13:20 UTC (7d), by user"
    assert all(len(line) <= WIDTH for line in lines), lines
    assert lines[2].split() == ["alice", "1", "2", "1", "12.346", "7200000.500", "0.250", "1.000"]
    assert lines[3].startswith("a-very-long-user-...")
    assert lines[-1].split()[:4] == ["total", "2", "4", "2"]
    assert lines[-1].split()[4] == seconds_text(15.345679)
    assert usage_lines([], by="pipeline", since="30m", start=NOW)[1] == (
        "no step ran in this period"
    )


def test_usage_lines_by_run_name_the_run_and_its_pipeline() -> None:
    row = _row("0123456789abcdef", pipeline="training", user="bob")
    assert usage_lines([row], by="run", since="1h", start=NOW)[2].startswith("01234567 training ")


# -- sums in the metadata store -------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[MetadataStore]:
    store = MetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    yield store
    store.dispose()


def _record(*attempts: tuple[float, float, tuple[str, ...]]) -> dict[str, Any]:
    record = UsageRecord()
    for wall_s, cpu_s, gpus in attempts:
        record = record.then(wall_s=wall_s, cpu_s=cpu_s, gpus=gpus)
    return {"duration_s": 1.0, USAGE_KEY: record.encode()}


def seed(store: MetadataStore, now: float = NOW) -> dict[str, str]:
    """Runs of alice and bob: a trainer that failed once, a cpu step, a cache hit of that
    trainer in bob's run, a step that ended before the period and one that never started."""
    ids = {k: f"{k}-{now:.0f}" for k in ("p1", "p2", "r1", "r2", "r3", "fit", "old")}
    steps: list[dict[str, Any]] = [
        # alice, run r1 of "training": the trainer failed once, then ran on two GPUs.
        dict(id=ids["fit"], run_id=ids["r1"], invocation_id="fit", status="completed", attempt=2,
             ended_at=now - 50, step_metadata=_record((1.0, 0.75, ("0", "1")), (2.5, 2.25, ("0", "1")))),
        dict(id=f"prep-{now}", run_id=ids["r1"], invocation_id="prep", status="completed",
             attempt=1, ended_at=now - 60, step_metadata=_record((0.5, 0.5, ()))),
        # bob, run r2 of "training": reused the trainer, ran his own evaluate.
        dict(id=f"hit-{now}", run_id=ids["r2"], invocation_id="fit", status="cached", attempt=0,
             ended_at=now - 10, cached_from_step_run_id=ids["fit"], step_metadata={}),
        dict(id=f"eval-{now}", run_id=ids["r2"], invocation_id="eval", status="completed",
             attempt=1, ended_at=now - 5, step_metadata=_record((0.125, 0.125, ()))),
        dict(id=f"wait-{now}", run_id=ids["r2"], invocation_id="wait", status="pending",
             attempt=0, step_metadata={}),
        # bob, run r3 of "etl", long ago: outside the period.
        dict(id=ids["old"], run_id=ids["r3"], invocation_id="load", status="completed",
             attempt=1, ended_at=now - 90_000, step_metadata=_record((8.0, 8.0, ()))),
    ]  # fmt: skip
    with store.transaction() as s:
        for pid, name in ((ids["p1"], "training"), (ids["p2"], "etl")):
            s.add(PipelineRow(id=pid, name=name, created_at=now - 100_000))
        for rid, pid, name, user in (
            (ids["r1"], ids["p1"], "training", "alice"),
            (ids["r2"], ids["p1"], "training", "bob"),
            (ids["r3"], ids["p2"], "etl", "bob"),
        ):
            s.add(
                RunRow(id=rid, pipeline_id=pid, pipeline_name=name, name=rid, status="completed",
                       spec="{}", config={}, environment={}, user=user, created_at=now - 100_000)
            )  # fmt: skip
        s.flush()
        for i, st in enumerate(steps):
            started = st.get("ended_at")
            s.add(
                StepRunRow(step_name=st["invocation_id"], position=i, code_hash="h",
                           source_hash="h", started_at=None if started is None else started - 1,
                           **st)
            )  # fmt: skip
    return ids


def check_sums(store: MetadataStore, ids: dict[str, str], now: float = NOW) -> None:
    """What :func:`seed` must sum to, by user, pipeline and run (exactly: microseconds)."""
    with store.read() as s:
        by_user = {t.key: t for t in usage_by(s, by="user", since=now - 3600)}
        by_pipeline = usage_by(s, by="pipeline", since=now - 3600)
        by_run = {t.key: t for t in usage_by(s, by="run", since=now - 3600)}
        everything = {t.key: t for t in usage_by(s, by="pipeline", since=now - 100_000)}
        originals = records_of(s, [ids["fit"], "no-such-step"])

    alice, bob = by_user["alice"], by_user["bob"]
    assert list(by_user) == ["alice", "bob"]  # most GPU-seconds first
    # Alice paid for both trainer attempts (2 GPUs each) and her cpu step.
    assert (alice.runs, alice.steps, alice.cached_steps) == (1, 2, 0)
    assert (alice.wall_s, alice.cpu_s, alice.gpu_s) == (4.0, 3.5, 7.0)
    assert (alice.saved_wall_s, alice.saved_cpu_s, alice.saved_gpu_s) == (0.0, 0.0, 0.0)
    # Bob's cache hit saved the trainer's final attempt; his run of long ago is not counted.
    assert (bob.runs, bob.steps, bob.cached_steps) == (1, 1, 1)
    assert (bob.wall_s, bob.cpu_s, bob.gpu_s) == (0.125, 0.125, 0.0)
    assert (bob.saved_wall_s, bob.saved_cpu_s, bob.saved_gpu_s) == (2.5, 2.25, 5.0)
    assert (alice.pipeline, alice.user) == (None, "alice")

    assert [(t.key, t.runs, t.cpu_s, t.saved_gpu_s) for t in by_pipeline] == [
        ("training", 2, 3.625, 5.0)
    ]
    assert by_pipeline[0].user is None
    assert set(by_run) == {ids["r1"], ids["r2"]}
    assert (by_run[ids["r2"]].pipeline, by_run[ids["r2"]].user) == ("training", "bob")
    assert by_run[ids["r2"]].saved_cpu_s == 2.25
    assert everything["etl"].cpu_s == 8.0
    assert list(originals) == [ids["fit"]]
    assert originals[ids["fit"]].gpus == ("0", "1")


def test_usage_by_sums_costs_and_savings_per_user_pipeline_and_run(
    sqlite_store: MetadataStore,
) -> None:
    check_sums(sqlite_store, seed(sqlite_store))


def test_usage_by_refuses_an_unknown_grouping(sqlite_store: MetadataStore) -> None:
    with sqlite_store.read() as s, pytest.raises(ValueError, match="user, pipeline, run"):
        usage_by(s, by="host", since=NOW)
