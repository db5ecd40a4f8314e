"""``diff_runs``: what differs between two recorded runs, area by area, and how it reads."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from scheduler.specs import InputRef, InputSpec, PipelineSpec, StepSpec
from zenml_workers.sdk.rundiff import RunRecord, diff_runs

SRC_V1 = "def train(data: list, lr: float = 0.1) -> float:\n    return sum(data) * lr\n"
SRC_V2 = "def train(data: list, lr: float = 0.1) -> float:\n    return sum(data) * lr * 2\n"


def record(run_id: str = "A", **changes: Any) -> RunRecord:
    load = StepSpec("load", "load", "code:load", "sha256:load", parameters={"rows": 10})
    train = StepSpec(
        "train",
        "train",
        "code:train1",
        "sha256:train1",
        inputs=(InputSpec("data", (InputRef("load", "data"),)),),
        parameters={"lr": 0.1},
        upstream=("load",),
    )
    base = RunRecord(
        id=run_id,
        spec=PipelineSpec("training", (load, train), parameters={"rows": 10, "lr": 0.1}),
        config={"stack": {"stack": "default", "artifact_uri": "s3://team/a"}},
        environment={
            "system": {"python": "3.11.9", "implementation": "CPython"},
            "packages": {"numpy": "1.26.4", "pandas": "2.2.0", "old-lib": "0.1"},
            "git": {"commit": "abc123", "dirty": False, "branch": "main", "root": "/home/a"},
        },
        input_hashes={"train": {"data": ("sha256:d1",)}},
        sources={"code:load": "def load(rows): ...\n", "code:train1": SRC_V1},
    )
    return replace(base, **changes)


def test_identical_runs_say_so() -> None:
    result = diff_runs(record("A"), record("B"))
    assert result.identical
    assert result.lines() == [
        "runs A and B do not differ in code, parameters, inputs, git state, Python, packages "
        "or stack"
    ]


def test_a_code_change_names_the_step_and_shows_the_source_diff() -> None:
    a = record("A")
    train2 = replace(a.spec.step("train"), code_hash="code:train2", source_hash="sha256:train2")
    b = record(
        "B",
        spec=replace(a.spec, steps=(a.spec.step("load"), train2)),
        sources={**a.sources, "code:train2": SRC_V2},
    )
    result = diff_runs(a, b)
    (code,) = result.area("code")
    assert code.subject == "train"
    assert code.describe() == "step 'train': code changed (sha256:train1 -> sha256:train2)"
    assert "-    return sum(data) * lr" in code.detail
    assert "+    return sum(data) * lr * 2" in code.detail
    assert [c.area for c in result.changes] == ["code"]
    assert "    +    return sum(data) * lr * 2" in result.lines()


def test_a_code_change_without_recorded_source_has_no_detail() -> None:
    a = record("A")
    train2 = replace(a.spec.step("train"), code_hash="code:train2", source_hash="sha256:train2")
    b = record("B", spec=replace(a.spec, steps=(a.spec.step("load"), train2)))
    (code,) = diff_runs(a, b).area("code")
    assert code.detail == ()


def test_parameter_and_input_changes_are_listed_per_pipeline_and_step() -> None:
    a = record("A")
    train = replace(a.spec.step("train"), parameters={"lr": 0.2})
    b = record(
        "B",
        spec=replace(
            a.spec, steps=(a.spec.step("load"), train), parameters={"rows": 10, "lr": 0.2}
        ),
        input_hashes={"train": {"data": ("sha256:d2",)}},
    )
    result = diff_runs(a, b)
    assert [c.describe() for c in result.area("parameters")] == [
        "pipeline parameter lr: 0.1 -> 0.2",
        "step 'train' parameter lr: 0.1 -> 0.2",
    ]
    assert [c.describe() for c in result.area("inputs")] == [
        "step 'train' input 'data': content hash sha256:d1 -> sha256:d2"
    ]


def test_package_python_git_and_stack_changes() -> None:
    a = record("A")
    env = dict(a.environment)
    env["packages"] = {"numpy": "2.0.0", "pandas": "2.2.0", "scikit-learn": "1.5.0"}
    env["system"] = {"python": "3.12.1", "implementation": "CPython"}
    env["git"] = {"commit": "def456", "dirty": True, "branch": "main", "root": "/home/b"}
    b = record(
        "B", environment=env, config={"stack": {"stack": "gpu", "artifact_uri": "s3://team/a"}}
    )
    result = diff_runs(a, b)
    assert [c.describe() for c in result.area("packages")] == [
        "package numpy: 1.26.4 -> 2.0.0",
        "package old-lib: removed (was 0.1)",
        "package scikit-learn: added (1.5.0)",
    ]
    assert [c.describe() for c in result.area("python")] == ["python: 3.11.9 -> 3.12.1"]
    assert [c.describe() for c in result.area("git")] == [
        "git commit: abc123 -> def456",
        "git dirty: False -> True",
    ]  # the checkout's folder is not compared: teammates' homes differ
    assert [c.describe() for c in result.area("stack")] == ["stack stack: default -> gpu"]
    lines = result.lines()
    assert lines[:2] == ["A = run A", "B = run B"]
    assert "packages:" in lines and "  package scikit-learn: added (1.5.0)" in lines


def test_steps_in_one_run_only() -> None:
    a = record("A")
    b = record("B", spec=replace(a.spec, steps=(a.spec.step("load"),)))
    assert [c.describe() for c in diff_runs(a, b).area("steps")] == [
        "step 'train' is only in run A"
    ]
    assert [c.describe() for c in diff_runs(b, a).area("steps")] == [
        "step 'train' is only in run B"
    ]
