"""Unit tests for ``scheduler.cache``: ingredients, keys and the explanations built from them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from scheduler.cache import CACHE_KEY_VERSION, cache_key, explain, ingredients
from scheduler.specs import InputRef, InputSpec, OutputSpec, StepSpec
from tests.pipelines import basic, edited_v1, edited_v2

HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64
JSON_MATERIALIZER = "zenml_workers.sdk.materializers.builtins:JsonMaterializer"


def _spec(**changes: Any) -> StepSpec:
    base = StepSpec(
        invocation_id="train",
        name="train",
        code_hash="sha256:" + "c" * 64,
        source_hash="sha256:" + "d" * 64,
        inputs=(InputSpec("data", (InputRef("load", "dataset"),)),),
        parameters={"epochs": 10, "lr": 0.1},
        upstream=("load",),
        outputs=(OutputSpec("model", "builtins:dict", JSON_MATERIALIZER),),
    )
    return replace(base, **changes)


def _key(spec: StepSpec, inputs: dict[str, list[str]] | None = None) -> str:
    return cache_key(ingredients(spec, {"data": [HASH_A]} if inputs is None else inputs))


# -- ingredients ------------------------------------------------------------------------------


def test_ingredients_hold_code_parameters_inputs_and_materializers() -> None:
    ingr = ingredients(_spec(), {"data": [HASH_A]})

    assert ingr == {
        "v": CACHE_KEY_VERSION,
        "step": "train",
        "source_hash": "sha256:" + "d" * 64,
        "parameters": '{"epochs":10,"lr":0.1}',
        "inputs": {"data": [HASH_A]},
        "materializers": {"model": JSON_MATERIALIZER},
    }


def test_ingredients_leave_out_where_and_how_the_step_runs() -> None:
    """Queue, retries, timeouts, settings, the invocation id and the pickled code do not matter."""
    moved = _spec(
        invocation_id="train_2",
        code_hash="sha256:" + "e" * 64,
        queue="gpu",
        step_type="trainer",
        retries=3,
        timeout_s=60.0,
        enable_cache=False,
        settings={"resources": {"gpu": 1}},
        upstream=("other",),
    )

    assert _key(moved) == _key(_spec())


def test_cache_key_is_a_sha256_and_deterministic() -> None:
    key = _key(_spec())

    assert key.startswith("sha256:") and len(key) == len("sha256:") + 64
    assert key == _key(_spec())


# -- parameters -------------------------------------------------------------------------------


def test_parameter_dict_order_does_not_change_the_key() -> None:
    a = _spec(parameters={"lr": 0.1, "epochs": 10, "opts": {"b": 1, "a": [1, 2]}})
    b = _spec(parameters={"opts": {"a": [1, 2], "b": 1}, "epochs": 10, "lr": 0.1})

    assert _key(a) == _key(b)


@pytest.mark.parametrize(("left", "right"), [(0.001, 1e-3), (1.50, 1.5), (float("0.1"), 0.1)])
def test_float_spelling_does_not_change_the_key(left: float, right: float) -> None:
    assert _key(_spec(parameters={"lr": left})) == _key(_spec(parameters={"lr": right}))


@pytest.mark.parametrize(
    "parameters",
    [
        {"epochs": 11, "lr": 0.1},
        {"epochs": 10, "lr": 0.2},
        {"epochs": 10},
        {"epochs": 10, "lr": 0.1, "extra": None},
        {"epochs": 10.0, "lr": 0.1},  # an integral float stays distinct from an int
        {"epochs": "10", "lr": 0.1},
    ],
)
def test_any_parameter_change_changes_the_key(parameters: dict[str, Any]) -> None:
    assert _key(_spec(parameters=parameters)) != _key(_spec())


def test_list_order_in_parameters_matters() -> None:
    assert _key(_spec(parameters={"layers": [1, 2]})) != _key(_spec(parameters={"layers": [2, 1]}))


# -- inputs -----------------------------------------------------------------------------------


def test_inputs_enter_by_content_hash_only() -> None:
    same_bytes_elsewhere = _spec(inputs=(InputSpec("data", (InputRef("other_loader", "frame"),)),))

    assert _key(same_bytes_elsewhere, {"data": [HASH_A]}) == _key(_spec(), {"data": [HASH_A]})
    assert _key(_spec(), {"data": [HASH_B]}) != _key(_spec(), {"data": [HASH_A]})


def test_fan_in_input_order_matters() -> None:
    assert _key(_spec(), {"data": [HASH_A, HASH_B]}) != _key(_spec(), {"data": [HASH_B, HASH_A]})


def test_input_dict_order_does_not_matter() -> None:
    first = ingredients(_spec(), {"a": [HASH_A], "b": [HASH_B]})
    second = ingredients(_spec(), {"b": [HASH_B], "a": [HASH_A]})

    assert cache_key(first) == cache_key(second)


# -- code and materializers -------------------------------------------------------------------


def test_materializer_change_changes_the_key() -> None:
    pickled = _spec(
        outputs=(
            OutputSpec(
                "model",
                "builtins:dict",
                "zenml_workers.sdk.materializers.pickle:CloudpickleMaterializer",
            ),
        )
    )

    assert _key(pickled) != _key(_spec())
    reasons = explain(
        ingredients(_spec(), {"data": [HASH_A]}), ingredients(pickled, {"data": [HASH_A]})
    )
    assert reasons == ["its output materializers changed"]


def test_source_change_changes_the_key() -> None:
    assert _key(_spec(source_hash="sha256:" + "f" * 64)) != _key(_spec())


def test_edited_step_body_gives_a_new_source_hash_but_decorator_options_do_not() -> None:
    v1, v2 = edited_v1.transform, edited_v2.transform

    assert v1.name == v2.name
    assert v1.source_hash != v2.source_hash
    assert v1.with_options(retries=3, enable_cache=False).source_hash == v1.source_hash


def test_step_built_in_a_pipeline_keys_like_its_spec() -> None:
    spec = basic.chain.build(n=3).spec.step("add")
    again = basic.chain.build(n=3).spec.step("add")
    other = basic.chain.build(n=4).spec.step("source")

    assert _key(spec, {"x": [HASH_A]}) == _key(again, {"x": [HASH_A]})
    assert spec.source_hash == basic.add.source_hash
    assert other.parameters == {"n": 4}


# -- explanations -----------------------------------------------------------------------------


def test_explain_identical_ingredients_is_empty() -> None:
    ingr = ingredients(_spec(), {"data": [HASH_A]})

    assert explain(ingr, dict(ingr)) == []


def test_explain_without_previous_run() -> None:
    reasons = explain(None, ingredients(_spec(), {"data": [HASH_A]}))

    assert len(reasons) == 1 and "no earlier run" in reasons[0]


def test_explain_names_changed_parameters_with_both_values() -> None:
    before = ingredients(_spec(), {"data": [HASH_A]})
    after = ingredients(_spec(parameters={"epochs": 20, "lr": 0.1}), {"data": [HASH_A]})

    assert explain(before, after) == [
        'its parameters changed: {"epochs":10,"lr":0.1} -> {"epochs":20,"lr":0.1}'
    ]


def test_explain_names_code_and_input_changes_together() -> None:
    before = ingredients(_spec(), {"data": [HASH_A]})
    after = ingredients(_spec(source_hash="sha256:" + "f" * 64), {"data": [HASH_B]})

    assert explain(before, after) == [
        "the step's code changed",
        "the content of input 'data' changed",
    ]


def test_explain_added_and_removed_inputs() -> None:
    before = ingredients(_spec(), {"data": [HASH_A], "old": [HASH_B]})
    after = ingredients(_spec(), {"data": [HASH_A], "new": [HASH_B]})

    assert explain(before, after) == ["input 'new' is new", "input 'old' was removed"]


def test_explain_key_format_change() -> None:
    before = dict(ingredients(_spec(), {"data": [HASH_A]}), v=CACHE_KEY_VERSION - 1)
    after = ingredients(_spec(), {"data": [HASH_A]})

    assert explain(before, after) == ["the cache-key format changed"]
