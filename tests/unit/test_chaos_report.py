"""The chaos bench's pure parts: the fault plan, the clients' output and the summary."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

from bench.chaos import (
    PARTITION,
    POOL_KILL,
    POSTGRES_RESTART,
    REDIS_RESTART,
    TARGET,
    WORKER_KILL,
    ChaosSummary,
    Fault,
    RunRecord,
    chaos_results,
    duplicate_outputs,
    parse_client_output,
    plan_faults,
    summarise,
)

T0 = 1_000.0


def _run(
    run_id: str,
    status: str = "completed",
    start: float = 0,
    end: float | None = 10,
    *,
    output: int | None = 6,
    error: str = "",
) -> RunRecord:
    return RunRecord(
        marker_dir=f"/m/{run_id}",
        pipeline="diamond",
        run_id=run_id,
        status=status,
        submitted_at=T0 + start,
        ended_at=None if end is None else T0 + end,
        output=output,
        expected=6,
        error=error,
    )


def _summary(
    runs: Sequence[RunRecord],
    faults: Sequence[Fault] = (),
    *,
    bodies: Mapping[str, Mapping[str, int]] | None = None,
    problems: Mapping[str, Sequence[str]] | None = None,
    horizon: float = T0 + 100,
) -> ChaosSummary:
    return summarise(runs, faults, bodies=bodies or {}, problems=problems or {}, horizon=horizon)


def test_chaos_plan_strikes_each_one_off_once_every_10_to_20_s() -> None:
    plan = plan_faults(random.Random(7), 300.0)

    offsets = [t for t, _ in plan]
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert all(10.0 <= g <= 20.0 for g in gaps) and offsets[-1] < 300.0
    kinds = [k for _, k in plan]
    assert [kinds.count(k) for k in (REDIS_RESTART, POSTGRES_RESTART, PARTITION)] == [1, 1, 1]
    assert set(kinds) <= {WORKER_KILL, POOL_KILL, REDIS_RESTART, POSTGRES_RESTART, PARTITION}
    assert next(t for t, k in plan if k == PARTITION) + 30.0 <= 300.0


def test_chaos_plan_is_reproducible_from_its_seed() -> None:
    assert plan_faults(random.Random(3), 120.0) == plan_faults(random.Random(3), 120.0)


def test_chaos_plan_too_short_for_a_partition_leaves_it_out() -> None:
    plan = plan_faults(random.Random(1), 25.0)

    assert 1 <= len(plan) <= 2
    assert PARTITION not in [k for _, k in plan]


def test_chaos_client_output_run_line_overrides_its_submit_line() -> None:
    sub = {"marker_dir": "/m/a", "pipeline": "fan", "expected": 21, "submitted_at": 5.0}
    text = "\n".join(
        [
            "noise from a library",
            "SUBMIT " + json.dumps({**sub, "run_id": "a"}),
            "SUBMIT " + json.dumps({**sub, "run_id": "b", "marker_dir": "/m/b"}),
            "SUBMIT_ERROR " + json.dumps({**sub, "error": "MetadataStoreError: down"}),
            "RUN "
            + json.dumps(
                {**sub, "run_id": "a", "status": "completed", "ended_at": 9.0, "output": 21}
            ),
        ]
    )

    runs, errors = parse_client_output(text)

    by_id = {r.run_id: r for r in runs}
    assert (by_id["a"].status, by_id["a"].ended_at, by_id["a"].output) == ("completed", 9.0, 21)
    assert (by_id["b"].status, by_id["b"].ended_at) == ("unknown", None)
    assert [e["error"] for e in errors] == ["MetadataStoreError: down"]


def test_chaos_duplicate_outputs_are_read_from_commit_problems() -> None:
    assert duplicate_outputs("join: artifact rows ['total', 'total']") == ["total"]
    assert duplicate_outputs("nap_2: output edges ['part', 'part', 'part']") == ["part"]
    assert duplicate_outputs("join: artifact rows []") == []
    assert duplicate_outputs("join is failed") == []
    assert duplicate_outputs("hold: s3://b/x is not attempt 2's") == []


def test_chaos_summary_counts_completed_failed_lost_and_wrong_outputs() -> None:
    runs = [
        _run("ok"),
        _run("wrong", output=7),
        _run("failed", status="failed", error="hold: WorkerLostError"),
        _run("lost", status="running", end=None),
        _run("gone", status="unknown", end=None),
    ]

    s = _summary(runs)

    assert (s.submitted, s.completed, s.failed, s.lost, s.wrong_output) == (5, 2, 1, 2, 1)
    assert s.lost_runs == ("lost", "gone")
    assert s.failed_runs == ("failed hold: WorkerLostError",)


def test_chaos_summary_counts_each_output_committed_twice_once() -> None:
    problems = {
        "a": ["join: artifact rows ['total', 'total']", "join: output edges ['total', 'total']"],
        "b": ["hold: s3://b/x is not attempt 2's"],
    }

    s = _summary([_run("a"), _run("b")], problems=problems)

    assert s.committed_twice == 1 and s.duplicates == ("a join.total",)
    assert s.other_commit_problems == 1


def test_chaos_summary_rerun_is_explained_only_by_a_death_or_partition_in_its_lifetime() -> None:
    runs = [
        _run("killed", end=10),
        _run("partitioned", start=15, end=50),
        _run("alone", start=60, end=70),
    ]
    faults = [
        Fault(WORKER_KILL, T0 + 5),
        Fault(PARTITION, T0 + 20, until=T0 + 55),  # healed after "partitioned" ended: overlaps
        Fault(REDIS_RESTART, T0 + 65, until=T0 + 66),  # loses queues, kills no step body
    ]
    bodies = {
        "killed": {"hold": 2, "source": 1},
        "partitioned": {"branch_1": 2},
        "alone": {"join": 3, "source": 2},
    }

    s = _summary(runs, faults, bodies=bodies)

    assert s.reruns == 4
    assert s.unexplained == ("alone join x3", "alone source x2")
    assert s.unexplained_reruns == 2


def test_chaos_summary_lost_run_lives_until_the_horizon() -> None:
    runs = [_run("lost", status="running", start=0, end=None)]
    bodies = {"lost": {"hold": 2}}

    explained = _summary(runs, [Fault(POOL_KILL, T0 + 90)], bodies=bodies, horizon=T0 + 100)
    late = _summary(runs, [Fault(POOL_KILL, T0 + 150)], bodies=bodies, horizon=T0 + 100)

    assert explained.unexplained_reruns == 0 and late.unexplained_reruns == 1


def test_chaos_summary_worst_fault_to_completion_takes_runs_in_flight_only() -> None:
    runs = [
        _run("before", start=0, end=4),  # ended before the fault
        _run("during", start=2, end=30),
        _run("after", start=6, end=80),  # submitted after the fault
        _run("failed", status="failed", start=1, end=99),
    ]
    faults = [Fault(WORKER_KILL, T0 + 5), Fault(POSTGRES_RESTART, T0 + 40, until=T0 + 43)]

    s = _summary(runs, faults)

    assert s.worst_fault_to_completion_s == 40.0
    assert s.worst["fault"] == POSTGRES_RESTART and s.worst["run"] == "after"
    assert s.worst_by_kind == {WORKER_KILL: 25.0, POSTGRES_RESTART: 40.0}
    assert s.faults_by_kind == {WORKER_KILL: 1, POSTGRES_RESTART: 1}


def test_chaos_summary_without_faults_has_no_worst_time() -> None:
    s = _summary([_run("a")])

    assert s.worst_fault_to_completion_s is None and s.worst == {}
    assert "worst fault->completion -" in s.line()


def test_chaos_results_are_named_targeted_and_carry_the_details() -> None:
    runs = [_run("a"), _run("b", status="running", end=None)]
    faults = [Fault(WORKER_KILL, T0 + 5, target="cpu@p1")]
    bodies = {"a": {"hold": 2}}
    s = _summary(runs, faults, bodies=bodies)

    results = chaos_results(s, faults, runs, bodies=bodies, extra={"seed": 3})

    by_name = {r.name: r for r in results}
    assert all(r.name.startswith("chaos.") and r.target == TARGET for r in results)
    assert by_name["chaos.runs_submitted"].value == 2
    assert by_name["chaos.runs_lost"].value == 1 and by_name["chaos.runs_lost"].raw["runs"] == (
        "b",
    )
    assert by_name["chaos.worst_fault_to_completion"].value == 5.0
    assert by_name["chaos.faults"].raw["by_kind"] == {WORKER_KILL: 1}
    details = by_name["chaos.runs_submitted"].raw
    assert details["seed"] == 3 and details["summary"] == s.line()
    assert details["faults"][0]["t_s"] == 5.0 and details["faults"][0]["target"] == "cpu@p1"
    assert [r["reran"] for r in details["runs"]] == [{"hold": 2}, {}]
