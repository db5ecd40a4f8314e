"""Unit tests for ``@pipeline`` and ``Pipeline.build``: wiring, ordering, specs, build-time errors."""

from __future__ import annotations

import sys
import threading
import types
from typing import Annotated, Any, Literal, Optional

import pytest

from scheduler.specs import InputRef, InputSpec, PipelineSpec
from tests.pipelines import basic
from zenml_workers.errors import DefinitionError, PipelineDefinitionError
from zenml_workers.sdk.graph import StepOutput, StepOutputs, current_build
from zenml_workers.sdk.pipeline import BuiltPipeline, Pipeline, pipeline
from zenml_workers.sdk.resources import Resources, ResourceSettings
from zenml_workers.sdk.step import step, trainer


class Animal:
    """Plain classes for the output/input compatibility checks."""


class Dog(Animal):
    pass


class Car:
    pass


@step
def make_dog() -> Annotated[Dog, "dog"]:
    return Dog()


@step
def make_car() -> Annotated[Car, "car"]:
    return Car()


@step
def pet(animal: Animal) -> Annotated[str, "sound"]:
    return "woof"


@step
def log(message: str = "") -> None:
    pass


@step
def typed(
    count: int = 0,
    ratio: float = 0.5,
    flag: bool = False,
    mode: Literal["a", "b"] = "a",
    maybe: Optional[int] = None,
    tags: list[str] | None = None,
    extra: dict[str, int] | None = None,
) -> int:
    return count


def _build(body: Any, **params: Any) -> BuiltPipeline:
    return pipeline(name="p")(body).build(**params)


def _ids(built: BuiltPipeline) -> list[str]:
    return [s.invocation_id for s in built.spec.steps]


# -- the fixture pipelines ----------------------------------------------------------------------


def test_build_chain_wires_each_step_to_the_previous() -> None:
    spec = basic.chain.build(n=5).spec
    assert _ids(basic.chain.build()) == ["source", "add", "multiply"]
    add = spec.step("add")
    assert add.inputs == (InputSpec("x", (InputRef("source", "value"),)),)
    assert add.upstream == ("source",)
    assert spec.step("multiply").inputs[0].refs == (InputRef("add", "sum"),)
    assert spec.step("source").parameters == {"n": 5}
    assert spec.parameters == {"n": 5}


def test_build_records_defaults_explicitly() -> None:
    spec = basic.chain.build().spec
    assert spec.parameters == {"n": 3}
    assert spec.step("add").parameters == {"y": 1}
    assert spec.step("multiply").parameters == {"factor": 2}


def test_build_diamond_is_in_topological_call_order() -> None:
    built = basic.diamond.build()
    assert _ids(built) == ["source", "add", "multiply", "combine"]
    assert built.spec.step("combine").upstream == ("add", "multiply")
    assert built.spec.downstream()["source"] == ("add", "multiply")


def test_build_one_output_feeds_several_steps() -> None:
    spec = basic.diamond.build().spec
    for consumer in ("add", "multiply"):
        assert spec.step(consumer).inputs[0].refs == (InputRef("source", "value"),)


def test_build_fan_in_list_input() -> None:
    spec = basic.fan_out_fan_in.build().spec
    join = spec.step("join")
    work_ids = ["work"] + [f"work_{i}" for i in range(2, 51)]
    assert join.inputs == (
        InputSpec("parts", tuple(InputRef(w, "result") for w in work_ids), is_list=True),
    )
    assert join.upstream == tuple(sorted(work_ids))
    assert _ids(basic.fan_out_fan_in.build())[-1] == "join"
    assert spec.step("work_7").parameters == {"i": 6}


def test_build_multi_output_split() -> None:
    spec = basic.multi_output.build().spec
    assert _ids(basic.multi_output.build()) == ["make_list", "split", "size", "size_2"]
    assert spec.step("size").inputs[0].refs == (InputRef("split", "train"),)
    assert spec.step("size_2").inputs[0].refs == (InputRef("split", "test"),)
    assert spec.step("split").output_names() == ("train", "test")


def test_build_code_blobs_are_distinct_by_hash() -> None:
    built = basic.fan_out_fan_in.build()
    assert set(built.code) == {s.code_hash for s in built.spec.steps}
    assert len(built.code) == 3
    assert all(h == blob.code_hash for h, blob in built.code.items())


def test_build_spec_round_trips_through_encode_decode() -> None:
    for p in (basic.chain, basic.diamond, basic.fan_out_fan_in, basic.multi_output):
        spec = p.build().spec
        assert PipelineSpec.decode(spec.encode()) == spec


def test_build_is_deterministic() -> None:
    assert basic.diamond.build().spec.encode() == basic.diamond.build().spec.encode()


# -- invocation ids -----------------------------------------------------------------------------


def test_build_repeated_calls_get_numbered_ids() -> None:
    def body() -> None:
        log()
        log()
        log()

    assert _ids(_build(body)) == ["log", "log_2", "log_3"]


def test_build_custom_id() -> None:
    def body() -> None:
        s = basic.source(id="start")
        basic.add(s, id="plus")

    spec = _build(body).spec
    assert _ids(_build(body)) == ["start", "plus"]
    assert spec.step("plus").name == "add"
    assert spec.step("plus").inputs[0].refs == (InputRef("start", "value"),)


def test_build_auto_id_skips_taken_custom_id() -> None:
    def body() -> None:
        log(id="log_2")
        log()
        log()

    assert _ids(_build(body)) == ["log_2", "log", "log_3"]


def test_build_duplicate_id_is_an_error() -> None:
    def body() -> None:
        log(id="x")
        log(id="x")

    with pytest.raises(PipelineDefinitionError, match="pipeline 'p', step 'x'.*already used"):
        _build(body)


# -- outputs ------------------------------------------------------------------------------------


def test_build_step_call_returns_placeholders() -> None:
    seen: dict[str, Any] = {}

    def body() -> None:
        seen["one"] = basic.source()
        seen["many"] = basic.split(basic.make_list())
        seen["none"] = log()

    _build(body)
    assert isinstance(seen["one"], StepOutput) and not isinstance(seen["one"], StepOutputs)
    assert isinstance(seen["many"], StepOutputs) and isinstance(seen["many"], tuple)
    assert [o.output_name for o in seen["many"]] == ["train", "test"]
    assert seen["many"]["test"] is seen["many"][1]
    assert seen["none"] is None


def test_build_output_by_name() -> None:
    def body() -> None:
        basic.size(basic.split(basic.make_list())["test"])

    assert _build(body).spec.step("size").inputs[0].refs == (InputRef("split", "test"),)


def test_build_unknown_output_name_is_an_error() -> None:
    def body() -> None:
        basic.split(basic.make_list())["nope"]

    with pytest.raises(PipelineDefinitionError, match="step 'split'.*no output 'nope'.*'train'"):
        _build(body)


def test_build_unpacking_a_single_output_is_an_error() -> None:
    def body() -> None:
        a, b = basic.source()

    with pytest.raises(PipelineDefinitionError, match="step 'source'.*cannot be unpacked"):
        _build(body)


def test_build_passing_all_outputs_as_one_input_is_an_error() -> None:
    def body() -> None:
        basic.size(basic.split(basic.make_list()))

    with pytest.raises(PipelineDefinitionError, match="step 'size'.*all outputs of step 'split'"):
        _build(body)


def test_build_list_of_all_outputs_fans_in() -> None:
    @step
    def concat(parts: list[list[int]]) -> list[int]:
        return [x for p in parts for x in p]

    def body() -> None:
        concat(list(basic.split(basic.make_list())))

    spec = _build(body).spec.step("concat")
    assert spec.inputs[0].is_list
    assert spec.inputs[0].refs == (InputRef("split", "train"), InputRef("split", "test"))


def test_build_no_output_step_used_as_input_is_an_error() -> None:
    def body() -> None:
        basic.add(log())

    with pytest.raises(PipelineDefinitionError, match="step 'add'.*returns nothing"):
        _build(body)


def test_build_no_output_step_in_fan_in_is_an_error() -> None:
    def body() -> None:
        basic.join([basic.source(), log()])

    with pytest.raises(PipelineDefinitionError, match="step 'join'.*returns nothing"):
        _build(body)


def test_build_fan_in_mixing_values_is_an_error() -> None:
    def body() -> None:
        basic.join([basic.source(), 3])

    with pytest.raises(PipelineDefinitionError, match="step 'join'.*mixes step outputs"):
        _build(body)


def test_build_fan_in_into_non_list_input_is_an_error() -> None:
    def body() -> None:
        basic.add([basic.source(), basic.source()])

    with pytest.raises(PipelineDefinitionError, match="step 'add'.*list of step outputs"):
        _build(body)


def test_build_output_from_another_build_is_an_error() -> None:
    leaked: list[Any] = []

    def first() -> None:
        leaked.append(basic.source())

    def second() -> None:
        basic.add(leaked[0])

    _build(first)
    with pytest.raises(PipelineDefinitionError, match="step 'add'.*another pipeline build"):
        _build(second)


# -- arguments and parameters -------------------------------------------------------------------


def test_build_missing_required_input_is_an_error() -> None:
    def body() -> None:
        basic.combine(basic.source())

    with pytest.raises(PipelineDefinitionError, match="step 'combine'.*required input 'b'"):
        _build(body)


def test_build_unknown_keyword_is_an_error() -> None:
    def body() -> None:
        basic.add(1, z=2)

    with pytest.raises(PipelineDefinitionError, match="step 'add'.*unknown argument 'z'"):
        _build(body)


def test_build_too_many_positional_arguments_is_an_error() -> None:
    def body() -> None:
        basic.add(1, 2, 3)

    with pytest.raises(PipelineDefinitionError, match="step 'add'.*3 positional"):
        _build(body)


def test_build_argument_given_twice_is_an_error() -> None:
    def body() -> None:
        basic.add(1, x=2)

    with pytest.raises(PipelineDefinitionError, match="step 'add'.*'x' given twice"):
        _build(body)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": 3},
        {"ratio": 1},
        {"ratio": 0.25},
        {"flag": True},
        {"mode": "b"},
        {"maybe": None},
        {"maybe": 4},
        {"tags": ["x", "y"]},
        {"extra": {"k": 1}},
    ],
)
def test_build_parameter_of_right_type_is_recorded(kwargs: dict[str, Any]) -> None:
    def body() -> None:
        typed(**kwargs)

    params = _build(body).spec.step("typed").parameters
    assert {k: params[k] for k in kwargs} == kwargs


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"count": "3"}, "count"),
        ({"count": True}, "count"),
        ({"count": 1.5}, "count"),
        ({"ratio": "x"}, "ratio"),
        ({"flag": 1}, "flag"),
        ({"mode": "c"}, "mode"),
        ({"maybe": "4"}, "maybe"),
        ({"tags": ["x", 1]}, "tags"),
        ({"extra": {"k": "v"}}, "extra"),
    ],
)
def test_build_parameter_of_wrong_type_is_an_error(kwargs: dict[str, Any], name: str) -> None:
    def body() -> None:
        typed(**kwargs)

    with pytest.raises(PipelineDefinitionError, match=f"step 'typed': parameter '{name}' expects"):
        _build(body)


def test_build_parameter_that_is_not_json_is_an_error() -> None:
    def body() -> None:
        basic.join(parts={1, 2})

    with pytest.raises(PipelineDefinitionError, match="step 'join'.*produce it from a step"):
        _build(body)


def test_build_parameter_is_normalised_to_json() -> None:
    def body() -> None:
        basic.join(parts=(1, 2))

    assert _build(body).spec.step("join").parameters == {"parts": [1, 2]}


def test_build_complex_annotation_accepts_json_values() -> None:
    @step
    def takes(value: Animal) -> int:
        return 1

    def body() -> None:
        takes({"name": "rex"})

    assert _build(body).spec.step("takes").parameters == {"value": {"name": "rex"}}


# -- type compatibility -------------------------------------------------------------------------


def test_build_incompatible_output_type_is_an_error() -> None:
    def body() -> None:
        pet(make_car())

    with pytest.raises(PipelineDefinitionError, match="step 'pet'.*expects Animal.*is Car"):
        _build(body)


def test_build_fan_in_item_of_incompatible_type_is_an_error() -> None:
    def body() -> None:
        basic.join([basic.source(), make_car()])

    with pytest.raises(PipelineDefinitionError, match="step 'join'.*expects int.*'car'.*is Car"):
        _build(body)


def test_build_subclass_output_type_is_accepted() -> None:
    def body() -> None:
        pet(make_dog())

    assert _build(body).spec.step("pet").upstream == ("make_dog",)


def test_build_builtin_mismatch_is_an_error_but_int_fits_float() -> None:
    @step
    def half(x: float) -> float:
        return x / 2

    @step
    def shout(text: str) -> str:
        return text

    _build(lambda: half(basic.source()))
    with pytest.raises(PipelineDefinitionError, match="step 'shout'.*expects str"):
        _build(lambda: shout(basic.source()))


def test_build_loose_annotations_skip_type_check() -> None:
    @step
    def anything(x: Any, y: Optional[Animal], z: list[int]) -> None:
        pass

    _build(lambda: anything(make_car(), make_dog(), make_car()))


# -- after= and ordering ------------------------------------------------------------------------


def test_build_after_orders_without_data() -> None:
    def body() -> None:
        log(id="first")
        log(id="second", after="first")
        basic.source(after=["first", "second"])

    spec = _build(body).spec
    assert spec.step("second").upstream == ("first",)
    assert spec.step("second").inputs == ()
    assert spec.step("source").upstream == ("first", "second")


def test_build_after_accepts_step_outputs() -> None:
    def body() -> None:
        s = basic.source()
        tr, _ = basic.split(basic.make_list())
        log(after=[s, tr])

    assert _build(body).spec.step("log").upstream == ("source", "split")


def test_build_after_a_later_step_reorders_topologically() -> None:
    def body() -> None:
        log(id="a", after="b")
        log(id="b")
        log(id="c")

    assert _ids(_build(body)) == ["b", "a", "c"]


def test_build_after_unknown_id_is_an_error() -> None:
    def body() -> None:
        log(after="ghost")

    with pytest.raises(PipelineDefinitionError, match="step 'log'.*after='ghost' names no step"):
        _build(body)


def test_build_after_cycle_is_an_error_naming_the_steps() -> None:
    def body() -> None:
        log(id="a", after="c")
        log(id="b", after="a")
        log(id="c", after="b")
        log(id="free")

    with pytest.raises(PipelineDefinitionError, match="cycle") as info:
        _build(body)
    message = str(info.value)
    assert "pipeline 'p'" in message
    for name in ("a", "b", "c"):
        assert f"'{name}'" in message or f"{name} ->" in message
    assert "free" not in message
    assert "a -> b -> c -> a" in message


def test_build_after_self_is_a_cycle() -> None:
    def body() -> None:
        log(id="a", after="a")

    with pytest.raises(PipelineDefinitionError, match=r"cycle \(a -> a\)"):
        _build(body)


def test_build_after_of_wrong_type_is_an_error() -> None:
    def body() -> None:
        log(after=3)

    with pytest.raises(PipelineDefinitionError, match="after=3"):
        _build(body)


# -- step options in the spec -------------------------------------------------------------------


def test_build_step_enable_cache_inherits_pipeline() -> None:
    @step(enable_cache=True)
    def cached() -> int:
        return 1

    def body() -> None:
        log()
        cached()

    off = pipeline(enable_cache=False)(body).build().spec
    assert off.enable_cache is False
    assert off.step("log").enable_cache is False
    assert off.step("cached").enable_cache is True
    on = pipeline(body).build().spec
    assert on.step("log").enable_cache is True


def test_build_records_retries_timeout_and_step_type() -> None:
    @trainer(retries=2, timeout_s=30)
    def train(x: int) -> Annotated[Dog, "model"]:
        return Dog()

    spec = _build(lambda: train(basic.source())).spec.step("train")
    assert (spec.retries, spec.timeout_s, spec.step_type, spec.queue) == (2, 30, "trainer", "gpu")


def test_build_queue_routing_in_spec() -> None:
    def body() -> None:
        log(id="plain")
        log.with_options(resources=Resources(gpu=1))(id="res")
        log.with_options(settings={"resources": ResourceSettings(gpu_count=1)})(id="zen")
        log.with_options(queue="io", resources=Resources(gpu=1))(id="explicit")

    spec = _build(body).spec
    queues = {s.invocation_id: s.queue for s in spec.steps}
    assert queues == {"plain": "cpu", "res": "gpu", "zen": "gpu", "explicit": "io"}


def test_build_settings_are_json_with_resolved_resources() -> None:
    s = log.with_options(
        resources=Resources(cpu=2), settings={"resources": ResourceSettings(gpu_count=1), "k": 1}
    )
    spec = _build(lambda: s()).spec.step("log")
    assert spec.settings == {"resources": {"cpu": 2, "gpu": 1, "memory": None}, "k": 1}
    assert PipelineSpec.decode(_build(lambda: s()).spec.encode()).step("log") == spec


def test_build_pipeline_settings_apply_to_every_step() -> None:
    def body() -> None:
        log()
        log.with_options(settings={"team": "b"})()

    p = pipeline(settings={"team": "a", "resources": ResourceSettings(gpu_count=1)})(body)
    spec = p.build().spec
    assert spec.step("log").settings["team"] == "a"
    assert spec.step("log_2").settings["team"] == "b"
    assert {s.queue for s in spec.steps} == {"gpu"}


# -- pipeline parameters and options ------------------------------------------------------------


def test_build_pipeline_parameters_recorded_with_defaults() -> None:
    assert basic.fan_out_fan_in.build(width=2).spec.parameters == {"seed": 7, "width": 2}
    assert len(basic.fan_out_fan_in.build(width=2).spec.steps) == 4


def test_build_pipeline_unknown_parameter_is_an_error() -> None:
    with pytest.raises(PipelineDefinitionError, match="pipeline 'chain' has no parameter 'm'"):
        basic.chain.build(m=1)


def test_build_pipeline_missing_parameter_is_an_error() -> None:
    @pipeline
    def needs(n: int) -> None:
        basic.source(n=n)

    with pytest.raises(PipelineDefinitionError, match="'needs' is missing required parameter 'n'"):
        needs.build()


def test_build_pipeline_parameter_of_wrong_type_is_an_error() -> None:
    with pytest.raises(PipelineDefinitionError, match="pipeline 'chain', parameter 'n' expects"):
        basic.chain.build(n="three")


def test_build_pipeline_parameter_not_json_is_an_error() -> None:
    @pipeline
    def loose(x=None) -> None:  # type: ignore[no-untyped-def]
        log()

    with pytest.raises(PipelineDefinitionError, match="pipeline 'loose', parameter 'x'.*JSON"):
        loose.build(x=object())


def test_build_pipeline_positional_arguments_are_an_error() -> None:
    with pytest.raises(PipelineDefinitionError, match=r"by keyword, e.g. chain\(n=\.\.\.\)"):
        basic.chain.build(3)
    with pytest.raises(PipelineDefinitionError, match="by keyword"):
        basic.chain(3)


def test_build_pipeline_without_steps_is_an_error() -> None:
    with pytest.raises(PipelineDefinitionError, match="calls no steps"):
        _build(lambda: None)


def test_pipeline_decorator_rejects_var_args_and_non_functions() -> None:
    def star(*xs: int) -> None:
        pass

    with pytest.raises(PipelineDefinitionError, match="parameter 'xs'"):
        pipeline(star)
    with pytest.raises(PipelineDefinitionError, match="must decorate a function"):
        pipeline(Animal)


def test_pipeline_with_options() -> None:
    renamed = basic.chain.with_options(name="chain2", enable_cache=False, settings={"k": 1})
    assert isinstance(renamed, Pipeline) and renamed is not basic.chain
    spec = renamed.build().spec
    assert (spec.name, spec.enable_cache) == ("chain2", False)
    assert all(s.settings == {"k": 1} and not s.enable_cache for s in spec.steps)
    assert (basic.chain.name, basic.chain.enable_cache) == ("chain", True)


def test_pipeline_call_delegates_to_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []
    fake = types.ModuleType("zenml_workers.sdk.runner")
    fake.run_pipeline = lambda p, params: calls.append((p, params)) or "run"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zenml_workers.sdk.runner", fake)
    assert basic.chain(n=4) == "run"
    assert calls == [(basic.chain, {"n": 4})]


def test_pipeline_call_inside_pipeline_is_an_error() -> None:
    with pytest.raises(PipelineDefinitionError, match="called inside pipeline 'p'"):
        _build(lambda: basic.chain())


def test_build_errors_share_the_definition_root() -> None:
    assert issubclass(PipelineDefinitionError, DefinitionError)


# -- build context ------------------------------------------------------------------------------


def test_build_context_is_cleared_after_build_even_on_error() -> None:
    def body() -> None:
        basic.source()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _build(body)
    assert current_build() is None
    assert basic.add(1) == 2


def test_build_nested_build_restores_outer_context() -> None:
    inner: list[BuiltPipeline] = []

    def body() -> None:
        s = basic.source()
        inner.append(basic.chain.build())
        basic.add(s)

    outer = _build(body)
    assert _ids(outer) == ["source", "add"]
    assert _ids(inner[0]) == ["source", "add", "multiply"]


def test_build_concurrent_builds_do_not_mix() -> None:
    barrier = threading.Barrier(2, timeout=10)
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def make(label: str, calls: int) -> Pipeline:
        def body() -> None:
            log(id=f"{label}_0")
            barrier.wait()  # both bodies are mid-build at once
            for i in range(1, calls):
                log(id=f"{label}_{i}")

        return pipeline(name=label)(body)

    def run(p: Pipeline) -> None:
        try:
            results[p.name] = _ids(p.build())
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(make(n, c),)) for n, c in (("x", 3), ("y", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert results == {"x": ["x_0", "x_1", "x_2"], "y": [f"y_{i}" for i in range(5)]}


# -- names ----------------------------------------------------------------------------------------

BAD_IDS = [
    ("v#x", "'#'"),
    ("v?x", "'?'"),
    ("a/b", "'/'"),
    ("..", "'.'"),
    ("a.b", "'.'"),  # the key joins the id, the attempt and the output name with dots
    ("modèle", "'è'"),
    ("two words", "U+0020"),
]


@pytest.mark.parametrize(("bad", "named"), BAD_IDS, ids=repr)
def test_build_refuses_an_invocation_id_that_is_not_a_name(bad: str, named: str) -> None:
    def body() -> None:
        basic.source(n=1, id=bad)

    with pytest.raises(PipelineDefinitionError) as info:
        _build(body)

    message = str(info.value)
    assert f"id={bad!r}" in message and named in message, message
    assert "letters, digits, '_' and '-'" in message


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("v#x", "'#'"),
        ("v?x", "'?'"),
        ("a/b", "'/'"),
        ("a..b", "'..'"),
        (".hidden", "start with '.'"),
        ("modèle", "'è'"),
        ("my pipeline", "U+0020"),
    ],
    ids=repr,
)
def test_pipeline_name_is_checked_at_decoration_and_in_with_options(bad: str, named: str) -> None:
    def body() -> None:
        basic.source(n=1)

    with pytest.raises(PipelineDefinitionError) as info:
        pipeline(name=bad)(body)
    assert named in str(info.value) and "letters, digits" in str(info.value)
    with pytest.raises(PipelineDefinitionError, match="the name"):
        basic.chain.with_options(name=bad)


def test_pipeline_and_invocation_names_with_dots_dashes_and_digits_are_kept() -> None:
    def body() -> None:
        basic.source(n=1, id="load-2024_v2")

    built = pipeline(name="team.train-v2")(body).build()

    assert built.spec.name == "team.train-v2"
    assert _ids(built) == ["load-2024_v2"]
