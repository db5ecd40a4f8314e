"""Copying a recorded pipeline with a step swapped (the signature check), what a retry says
per step and reuses, and how a rerun's outputs compare with the original's."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import pytest
from sqlalchemy import update

from scheduler import decisions, dispatch
from scheduler.specs import InputRef, InputSpec, OutputSpec, PipelineSpec, StepSpec
from stores.metadata import queries as q
from stores.metadata.models import StepRunRow
from stores.metadata.store import MetadataStore
from zenml_workers.errors import PipelineDefinitionError
from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.recorded import importable_pipeline, replace_step
from zenml_workers.sdk.replay import compare_outputs, retry_notes
from zenml_workers.sdk.step import step, trainer

NOW = 1_700_000_000.0


@step
def load(rows: int) -> Annotated[list[int], "data"]:
    return list(range(rows))


@trainer
def train(data: list[int], lr: float = 0.1) -> Annotated[float, "model"]:
    return sum(data) * lr


@step
def evaluate(model: float, data: list[int]) -> Annotated[float, "score"]:
    return model / len(data)


@step
def report(score: float) -> None:
    print(score)


@pipeline(name="training")
def training(rows: int = 5) -> None:
    data = load(rows=rows)
    score = evaluate(train(data), data)
    report(score, after="train")


def recorded() -> PipelineSpec:
    return training.build(rows=5).spec


def test_replace_step_keeps_wiring_and_takes_the_replacements_code() -> None:
    @step(queue="cpu")
    def evaluate_balanced(
        model: float, data: list[int], weight: float = 0.5
    ) -> Annotated[float, "score"]:
        return model * weight

    spec = recorded()
    new, blob = replace_step(spec, "evaluate", evaluate_balanced, pipeline_name="copy")
    old = spec.step("evaluate")
    assert new.invocation_id == "evaluate" and new.name == "evaluate_balanced"
    assert new.inputs == old.inputs and new.upstream == old.upstream
    assert new.parameters == {"weight": 0.5}
    assert new.code_hash == blob.code_hash != old.code_hash
    assert new.source_hash == evaluate_balanced.source_hash != old.source_hash


def test_replace_step_with_a_trainer_goes_to_the_gpu_queue_and_keeps_after_edges() -> None:
    @trainer
    def train_fast(data: list[int], lr: float = 0.1) -> Annotated[float, "model"]:
        return lr

    spec = recorded()
    new, _ = replace_step(spec, "train", train_fast, pipeline_name="copy")
    assert (new.queue, new.step_type, new.parameters) == ("gpu", "trainer", {"lr": 0.1})
    report_new, _ = replace_step(spec, "report", report, pipeline_name="copy")
    assert report_new.upstream == spec.step("report").upstream == ("evaluate", "train")


def _fails(inv: str, replacement: Any, *fragments: str) -> None:
    with pytest.raises(PipelineDefinitionError) as e:
        replace_step(recorded(), inv, replacement, pipeline_name="copy")
    for fragment in fragments:
        assert fragment in str(e.value)


def test_replace_step_refuses_a_missing_input() -> None:
    @step
    def model_only(model: float) -> Annotated[float, "score"]:
        return model

    _fails(
        "evaluate",
        model_only,
        "no parameter 'data', which the recorded step receives from step 'load'",
        "add a parameter 'data'",
    )


def test_replace_step_refuses_a_dropped_parameter() -> None:
    @trainer
    def no_lr(data: list[int]) -> Annotated[float, "model"]:
        return 1.0

    _fails("train", no_lr, "no parameter 'lr', which the recorded step is given (0.1)")


def test_replace_step_refuses_an_unwired_required_parameter() -> None:
    @step
    def needs_more(model: float, data: list[int], k: int) -> Annotated[float, "score"]:
        return 1.0

    _fails("evaluate", needs_more, "requires parameter 'k'", "give 'k' a default")


def test_replace_step_refuses_a_missing_or_mistyped_output_read_downstream() -> None:
    @trainer
    def renamed(data: list[int], lr: float = 0.1) -> Annotated[float, "weights"]:
        return 1.0

    @trainer
    def textual(data: list[int], lr: float = 0.1) -> Annotated[str, "model"]:
        return ""

    _fails("train", renamed, "no output 'model', which step 'evaluate' reads")
    _fails("train", textual, "returns str as output 'model'", "reads it as float")


def test_replace_step_refuses_a_mistyped_input_unknown_step_and_non_step() -> None:
    @step
    def wrong_type(model: str, data: list[int]) -> Annotated[float, "score"]:
        return 1.0

    _fails("evaluate", wrong_type, "input 'model' expects str", "is float")
    _fails("nope", evaluate, "has no step 'nope' to replace", "load, train, evaluate, report")
    _fails("evaluate", lambda model, data: 1.0, "not a step", "@step")


def test_importable_pipeline_finds_a_module_pipeline_only() -> None:
    found = importable_pipeline({"module": __name__, "qualname": "training"})
    assert found is training
    assert importable_pipeline({"module": "no_such_module_zw", "qualname": "x"}) is None
    assert importable_pipeline({"module": __name__, "qualname": "load"}) is None
    assert importable_pipeline(None) is None


def test_retry_notes_say_per_step_what_happens() -> None:
    notes = retry_notes(
        original_run_id="r1",
        original={"a": "completed", "b": "completed", "c": "failed", "d": "skipped"},
        new={
            "a": ("cached", "r1"),
            "b": ("ready", None),
            "c": ("ready", None),
            "d": ("pending", None),
            "e": ("pending", None),
        },
        changed=["b"],
        upstream={"b": ("a",), "c": ("b",), "d": ("c",), "e": ()},
    )
    assert notes == {
        "a": "reused from run r1",
        "b": "code changed: runs again",
        "c": "failed in run r1: runs again",
        "d": "skipped in run r1: runs again",
        "e": "new step: runs",
    }
    after = retry_notes(
        original_run_id="r1",
        original={"a": "completed", "b": "completed"},
        new={"a": ("ready", None), "b": ("pending", None)},
        changed=[],
        upstream={"b": ("a",)},
    )
    assert after == {
        "a": "runs again: its cache key differs from run r1's",
        "b": "runs again after upstream step 'a'",
    }


def test_compare_outputs_matches_differs_cached_and_not_run() -> None:
    original = {"a": {"x": "h1"}, "b": {"y": "h2", "z": "h3"}, "c": {"w": "h4"}, "d": {"v": "h5"}}
    compared = compare_outputs(
        original,
        {
            "a": ("completed", {"x": "h1"}),
            "b": ("completed", {"y": "h2", "z": "h9"}),
            "c": ("cached", {"w": "h4"}),
            "d": ("failed", {}),
        },
    )
    assert [(c.invocation_id, c.verdict) for c in compared] == [
        ("a", "match"),
        ("b", "differs"),
        ("c", "cached"),
        ("d", "not run"),
    ]
    assert compared[1].detail == "differs: output z hash h3 != h9"
    assert compared[2].detail == "cached: not re-executed"
    assert compared[3].detail == "not run: failed in the rerun"


# -- reuse in plan_run (what a retry relies on) ------------------------------------------


def _spec(n: int) -> PipelineSpec:
    """``a`` then ``b`` reading its output, caching off for both."""
    a = StepSpec(
        "a",
        "a",
        "code:a",
        "src:a",
        parameters={"n": n},
        outputs=(OutputSpec("x", "builtins:int"),),
        enable_cache=False,
    )
    b = StepSpec(
        "b",
        "b",
        "code:b",
        "src:b",
        inputs=(InputSpec("x", (InputRef("a", "x"),)),),
        upstream=("a",),
        outputs=(OutputSpec("y", "builtins:int"),),
        enable_cache=False,
    )
    return PipelineSpec("p", (a, b), enable_cache=False)


def _plan(store: MetadataStore, spec: PipelineSpec, reuse: dict[str, str] | None = None) -> str:
    run_id = str(uuid.uuid4())
    with store.transaction() as s:
        dispatch.plan_run(
            s,
            spec=spec,
            code_blobs=[],
            run_id=run_id,
            run_name=run_id,
            config={},
            environment={},
            user="u",
            orchestrator="celery",
            now=NOW,
            origin={"kind": "retry"} if reuse else None,
            reuse=reuse,
        )
    return run_id


def _complete_a(store: MetadataStore, run_id: str) -> tuple[str, str]:
    """Mark step ``a`` of a run completed with one output artifact; (step run id, artifact id)."""
    art = str(uuid.uuid4())
    with store.transaction() as s:
        sid = q.step_runs(s, run_id)[0].id
        s.execute(update(StepRunRow).where(StepRunRow.id == sid).values(status="completed"))
        q.add_artifacts(
            s,
            [
                {
                    "id": art,
                    "name": "x",
                    "uri": f"memory://none/{art}",
                    "data_type": "builtins:int",
                    "materializer": "m",
                    "content_hash": "sha256:x",
                    "size_bytes": 1,
                    "artifact_metadata": {},
                    "producer_run_id": run_id,
                    "producer_step_run_id": sid,
                    "created_at": NOW,
                }
            ],
        )
        q.add_lineage(s, [decisions.lineage_edge(sid, run_id, q.OUTPUT, "x", 0, art)])
    return sid, art


def _steps(store: MetadataStore, run_id: str) -> dict[str, Any]:
    with store.read() as s:
        return {
            r.invocation_id: (r.status, r.cached_from_step_run_id) for r in q.step_runs(s, run_id)
        }


def test_plan_run_reuses_the_given_step_run_even_with_caching_off(store: MetadataStore) -> None:
    original = _plan(store, _spec(1))
    sid, _ = _complete_a(store, original)

    assert _steps(store, _plan(store, _spec(1)))["a"] == ("queued", None)  # caching is off
    retried = _steps(store, _plan(store, _spec(1), reuse={"a": sid}))
    assert retried["a"] == ("cached", sid)
    assert retried["b"] == ("queued", None)  # its input is known now: it runs


def test_plan_run_does_not_reuse_when_the_cache_key_differs(store: MetadataStore) -> None:
    original = _plan(store, _spec(1))
    sid, _ = _complete_a(store, original)

    assert _steps(store, _plan(store, _spec(2), reuse={"a": sid}))["a"] == ("queued", None)
