"""Unit tests for ``@step`` / ``@trainer``: validation, outputs, options, source and code identity."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Any

import cloudpickle
import pytest

from tests.pipelines import basic
from zenml_workers.errors import ExecutionError, StepDefinitionError
from zenml_workers.sdk.materializers.registry import (
    materializer_for_type,
    materializer_path,
    type_path,
)
from zenml_workers.sdk.resources import Resources, ResourceSettings
from zenml_workers.sdk.step import Step, step, trainer


class Model:
    """A plain class used as an output type."""


# -- plain calls --------------------------------------------------------------------------------


def test_step_plain_call_runs_function() -> None:
    assert basic.add(2, y=5) == 7
    assert basic.split([1, 2, 3, 4, 5], ratio=0.4) == ([1, 2], [3, 4, 5])


def test_step_plain_call_rejects_id_and_after() -> None:
    with pytest.raises(TypeError, match="outside a pipeline"):
        basic.add(1, id="x")
    with pytest.raises(TypeError, match="outside a pipeline"):
        basic.add(1, after="source")


def test_step_keeps_function_metadata() -> None:
    assert basic.add.name == "add"
    assert basic.add.__name__ == "add"
    assert basic.add.__doc__ == "Return ``x + y``."
    assert basic.add.entrypoint.__name__ == "add"
    assert not isinstance(basic.add.entrypoint, Step)


def test_step_name_option_overrides_function_name() -> None:
    @step(name="loader")
    def load() -> int:
        return 1

    assert load.name == "loader"


# -- outputs ------------------------------------------------------------------------------------


def test_step_outputs_missing_annotation_is_one_any_output() -> None:
    @step
    def f(x: int):  # type: ignore[no-untyped-def]
        return x

    assert f.output_types == {"output": Any}
    assert f.output_specs()[0].materializer == ""


def test_step_outputs_none_means_no_outputs() -> None:
    @step
    def f(x: int) -> None:
        pass

    assert f.output_types == {}
    assert f.output_specs() == ()


def test_step_outputs_plain_type_is_named_output() -> None:
    @step
    def f() -> int:
        return 1

    assert f.output_types == {"output": int}


def test_step_outputs_annotated_names_the_output() -> None:
    @step
    def f() -> Annotated[Model, "model"]:
        return Model()

    assert f.output_types == {"model": Model}


def test_step_outputs_tuple_of_annotated_gives_several() -> None:
    assert basic.split.output_types == {"train": list[int], "test": list[int]}


def test_step_outputs_unnamed_tuple_members_are_numbered() -> None:
    @step
    def f() -> tuple[int, Annotated[str, "label"], float]:
        return 1, "a", 2.0

    assert list(f.output_types) == ["output_0", "label", "output_2"]
    assert f.output_types["output_2"] is float


@pytest.mark.parametrize("annotation", [tuple, tuple[int, ...], tuple[int]])
def test_step_outputs_bare_or_variadic_tuple_is_one_output(annotation: Any) -> None:
    def f() -> None:
        pass

    f.__annotations__["return"] = annotation
    assert list(step(f).output_types) == ["output"]


def test_step_outputs_annotated_tuple_is_one_output() -> None:
    @step
    def f() -> Annotated[tuple[int, int], "pair"]:
        return 1, 2

    assert f.output_types == {"pair": tuple[int, int]}


def test_step_outputs_duplicate_names_rejected() -> None:
    with pytest.raises(StepDefinitionError, match="output name 'a' is used twice"):

        @step
        def f() -> tuple[Annotated[int, "a"], Annotated[int, "a"]]:
            return 1, 2


def test_step_output_specs_record_type_path_and_materializer() -> None:
    specs = basic.split.output_specs()
    assert [s.name for s in specs] == ["train", "test"]
    assert specs[0].type_path == type_path(list[int])
    expected = materializer_for_type(list[int])
    assert specs[0].materializer == (materializer_path(expected) if expected else "")


def test_step_output_specs_for_int_name_a_materializer() -> None:
    spec = basic.add.output_specs()[0]
    assert spec.type_path == type_path(int)
    found = materializer_for_type(int)
    assert found is not None
    assert spec.materializer == materializer_path(found)


# -- validation at decoration -------------------------------------------------------------------


def test_step_rejects_var_args() -> None:
    with pytest.raises(StepDefinitionError, match=r"parameter 'rest'.*\*args"):

        @step
        def f(x: int, *rest: int) -> int:
            return x


def test_step_rejects_var_kwargs() -> None:
    with pytest.raises(StepDefinitionError, match=r"parameter 'extra'.*\*\*kwargs"):

        @step
        def f(x: int, **extra: int) -> int:
            return x


def test_step_rejects_unannotated_parameter_and_names_it() -> None:
    with pytest.raises(StepDefinitionError, match="parameter 'b' has no type annotation"):

        @step
        def f(a: int, b) -> int:  # type: ignore[no-untyped-def]
            return a


def test_step_rejects_positional_only_parameter() -> None:
    with pytest.raises(StepDefinitionError, match="positional-only"):

        @step
        def f(a: int, /) -> int:
            return a


@pytest.mark.parametrize("reserved", ["id", "after"])
def test_step_rejects_reserved_parameter_names(reserved: str) -> None:
    ns: dict[str, Any] = {}
    exec(f"def f({reserved}: int) -> int:\n    return 1\n", ns)
    with pytest.raises(StepDefinitionError, match=f"'{reserved}' is reserved"):
        step(ns["f"])


def test_step_rejects_non_function() -> None:
    with pytest.raises(StepDefinitionError, match="must decorate a function"):
        step(Model)
    with pytest.raises(StepDefinitionError, match="must decorate a function"):
        step(len)


def test_step_rejects_double_decoration() -> None:
    with pytest.raises(StepDefinitionError, match="already a step"):
        step(basic.add)


def test_step_rejects_async_function() -> None:
    with pytest.raises(StepDefinitionError, match="async"):

        @step
        async def f() -> int:
            return 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": True}, "retries"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"enable_cache": "yes"}, "enable_cache"),
        ({"queue": ""}, "queue"),
        ({"name": ""}, "name"),
        ({"settings": {"blob": object()}}, "JSON"),
        ({"settings": ["not", "a", "dict"]}, "settings"),
    ],
)
def test_step_rejects_invalid_options(options: dict[str, Any], message: str) -> None:
    def f() -> int:
        return 1

    with pytest.raises(StepDefinitionError, match=message):
        step(**options)(f)


# -- options and queues -------------------------------------------------------------------------


def test_step_with_options_returns_new_step() -> None:
    fast = basic.add.with_options(enable_cache=False, retries=3, timeout_s=5.0, name="fast_add")
    assert fast is not basic.add
    assert fast.entrypoint is basic.add.entrypoint
    assert (fast.name, fast.config.enable_cache, fast.config.retries) == ("fast_add", False, 3)
    assert fast.config.timeout_s == 5.0
    assert (basic.add.name, basic.add.config.enable_cache, basic.add.config.retries) == (
        "add",
        None,
        0,
    )


def test_step_with_options_merges_settings() -> None:
    s = step(settings={"a": 1, "b": 2})(lambda_free_function)
    t = s.with_options(settings={"b": 3, "c": 4})
    assert t.config.settings == {"a": 1, "b": 3, "c": 4}


def test_step_with_options_validates() -> None:
    with pytest.raises(StepDefinitionError, match="retries"):
        basic.add.with_options(retries=-2)


def lambda_free_function() -> int:
    return 1


def test_step_queue_defaults_to_cpu() -> None:
    assert basic.add.queue == "cpu"
    assert basic.add.step_type == "step"


def test_trainer_sets_step_type_and_gpu_queue() -> None:
    @trainer
    def train(x: int) -> Annotated[Model, "model"]:
        return Model()

    assert train.step_type == "trainer"
    assert train.queue == "gpu"


def test_trainer_accepts_options() -> None:
    @trainer(retries=1, queue="big-gpu")
    def train(x: int) -> int:
        return x

    assert (train.step_type, train.queue, train.config.retries) == ("trainer", "big-gpu", 1)


@pytest.mark.parametrize(
    "options",
    [
        {"resources": Resources(gpu=1)},
        {"settings": {"resources": ResourceSettings(gpu_count=1)}},
        {"settings": {"resources": {"gpu_count": 2}}},
    ],
)
def test_step_queue_gpu_when_resources_ask_for_gpu(options: dict[str, Any]) -> None:
    assert step(**options)(lambda_free_function).queue == "gpu"


def test_step_queue_cpu_when_resources_ask_for_no_gpu() -> None:
    s = step(resources=Resources(cpu=2, memory="1GB"))(lambda_free_function)
    assert s.queue == "cpu"


def test_step_queue_explicit_wins() -> None:
    s = step(queue="io", resources=Resources(gpu=1))(lambda_free_function)
    assert s.queue == "io"
    assert basic.add.with_options(queue="special").queue == "special"


# -- source and code identity -------------------------------------------------------------------


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step_source(decorator: str, body: str) -> str:
    return textwrap.dedent(
        f"""\
        from zenml_workers.sdk.step import step

        {decorator}
        def f(x: int) -> int:
            return {body}
        """
    )


def test_step_source_hash_ignores_decorator_arguments(tmp_path: Path) -> None:
    hashes = []
    for i, decorator in enumerate(["@step", "@step(retries=2, enable_cache=False)"]):
        path = tmp_path / f"dec_mod_{i}.py"
        path.write_text(_step_source(decorator, "x + 1"))
        hashes.append(_load_module(path, f"dec_mod_{i}").f.source_hash)
    assert hashes[0] == hashes[1]
    assert hashes[0].startswith("sha256:")


def test_step_source_hash_changes_with_body(tmp_path: Path) -> None:
    hashes = []
    for i, body in enumerate(["x + 1", "x + 2"]):
        path = tmp_path / f"body_mod_{i}.py"
        path.write_text(_step_source("@step", body))
        hashes.append(_load_module(path, f"body_mod_{i}").f.source_hash)
    assert hashes[0] != hashes[1]


def test_step_source_excludes_decorator_lines() -> None:
    assert basic.split.source.startswith("def split(")
    assert "@step" not in basic.split.source
    assert "cut = int(len(values) * ratio)" in basic.split.source


def test_step_source_hash_falls_back_to_bytecode_without_source() -> None:
    def compiled(body: str) -> Step:
        ns: dict[str, Any] = {}
        exec(compile(f"def f(x: int) -> int:\n    return {body}\n", "<repl>", "exec"), ns)
        return step(ns["f"])

    a, b, c = compiled("x + 1"), compiled("x + 1"), compiled("x + 2")
    assert a.source == ""
    assert a.source_hash.startswith("sha256-code:")
    assert a.source_hash == b.source_hash
    assert a.source_hash != c.source_hash


def test_step_code_blob_is_cached_per_step_object() -> None:
    assert basic.add.code_blob() is basic.add.code_blob()


def test_step_code_blob_hash_is_sha256_of_pickled_bytes() -> None:
    import hashlib

    blob = basic.add.code_blob()
    assert blob.code_hash == "sha256:" + hashlib.sha256(blob.pickled).hexdigest()
    assert (blob.name, blob.source) == ("add", basic.add.source)


def test_step_code_blob_importable_function_pickles_by_reference() -> None:
    blob = basic.add.code_blob()
    assert b"tests.pipelines.basic" in blob.pickled
    assert b"co_code" not in blob.pickled and len(blob.pickled) < 400
    fn = cloudpickle.loads(blob.pickled)
    assert fn is basic.add.entrypoint
    assert fn(2, 3) == 5


def test_step_code_blob_load_refuses_changed_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_name = "zw_edited_step_module"
    path = tmp_path / f"{module_name}.py"
    path.write_text(_step_source("@step", "x + 1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    blob = importlib.import_module(module_name).f.code_blob()
    assert cloudpickle.loads(blob.pickled)(1) == 2

    # A worker that imports an edited copy of the module must refuse the old blob.
    path.write_text(_step_source("@step", "x + 1000"))
    del sys.modules[module_name]
    importlib.invalidate_caches()
    with pytest.raises(ExecutionError, match="differs from the one the pipeline was built with"):
        cloudpickle.loads(blob.pickled)
    assert importlib.import_module(module_name).f.code_blob().code_hash != blob.code_hash


def test_step_code_blob_load_reports_unimportable_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_name = "zw_vanishing_step_module"
    (tmp_path / f"{module_name}.py").write_text(_step_source("@step", "x"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    blob = importlib.import_module(module_name).f.code_blob()
    (tmp_path / f"{module_name}.py").unlink()
    del sys.modules[module_name]
    importlib.invalidate_caches()
    with pytest.raises(ExecutionError, match="cannot import step function"):
        cloudpickle.loads(blob.pickled)


def test_source_bytecode_hash_ignores_hash_seed(tmp_path: Path) -> None:
    # A set literal compiles to a frozenset constant whose order follows the hash seed.
    (tmp_path / "zw_seeded.py").write_text(
        "def pick(x: str) -> bool:\n"
        "    return x in {'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta'}\n"
    )
    root = Path(__file__).resolve().parents[2]
    script = (
        "import zw_seeded; from zenml_workers.sdk.source import bytecode_hash; "
        "print(bytecode_hash(zw_seeded.pick))"
    )
    hashes = set()
    for seed in ("1", "2", "3", "4"):
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={
                "PYTHONPATH": f"{root}:{tmp_path}",
                "PATH": "/usr/bin:/bin",
                "PYTHONHASHSEED": seed,
            },
            check=False,
        )
        assert done.returncode == 0, done.stderr
        hashes.add(done.stdout.strip())
    assert len(hashes) == 1
    assert hashes.pop().startswith("sha256-code:")


def test_step_code_blob_local_function_pickles_by_value() -> None:
    offset = 40

    @step
    def shifted(x: int) -> int:
        return x + offset

    fn = cloudpickle.loads(shifted.code_blob().pickled)
    assert fn is not shifted.entrypoint
    assert fn(2) == 42


def test_step_code_blob_main_function_pickles_by_value(tmp_path: Path) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(
        textwrap.dedent(
            """\
            import sys
            from zenml_workers.sdk.step import step

            @step
            def triple(x: int) -> int:
                return 3 * x

            sys.stdout.write(triple.code_blob().pickled.hex())
            """
        )
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fn = cloudpickle.loads(bytes.fromhex(done.stdout))
    assert fn.__module__ == "__main__"
    assert fn(5) == 15


def test_step_with_options_keeps_code_identity() -> None:
    other = basic.add.with_options(retries=4)
    assert other.source_hash == basic.add.source_hash
    assert other.code_blob().code_hash == basic.add.code_blob().code_hash


# -- names ----------------------------------------------------------------------------------------

#: Names refused everywhere, with the character (or rule) the error must name.
BAD_NAMES = [
    ("v#x", "'#'"),
    ("v?x", "'?'"),
    ("a/b", "'/'"),
    ("..", "'.'"),
    ("a..b", "'..'"),
    (".hidden", "start with '.'"),
    ("modèle", "'è'"),
    ("two words", "U+0020"),
    ("tab\tname", "U+0009"),
    ("", "empty"),
    ("x" * 201, "over the limit"),
]


def _returning(annotation: Any) -> Any:
    """A function with this return annotation (a real object: this module's are strings)."""

    def make() -> None:
        return None

    make.__annotations__ = {"return": annotation}
    return make


@pytest.mark.parametrize(("bad", "named"), BAD_NAMES, ids=repr)
def test_step_output_name_is_checked_at_decoration(bad: str, named: str) -> None:
    with pytest.raises(StepDefinitionError) as info:
        step(_returning(Annotated[int, bad]))

    message = str(info.value)
    assert named in message, message
    assert "Annotated[..., 'name']" in message
    assert "letters, digits" in message or "limit" in message


@pytest.mark.parametrize(("bad", "named"), BAD_NAMES, ids=repr)
def test_step_tuple_output_names_are_checked_at_decoration(bad: str, named: str) -> None:
    with pytest.raises(StepDefinitionError, match="output name") as info:
        step(_returning(tuple[Annotated[int, "fine"], Annotated[int, bad]]))
    assert named in str(info.value)


#: Step names (the default invocation ids) may not hold '.' at all: keys join them with dots.
BAD_STEP_NAMES = [
    (bad, "'.'" if "." in bad else named) for bad, named in BAD_NAMES if bad and len(bad) < 200
] + [("a.b", "'.'")]


@pytest.mark.parametrize(("bad", "named"), BAD_STEP_NAMES, ids=repr)
def test_step_name_is_checked_at_decoration_and_in_with_options(bad: str, named: str) -> None:
    with pytest.raises(StepDefinitionError) as info:

        @step(name=bad)
        def make() -> int:
            return 1

    assert named in str(info.value)
    with pytest.raises(StepDefinitionError, match="the step name"):
        basic.add.with_options(name=bad)


def test_step_function_with_a_non_ascii_name_needs_a_name_option() -> None:
    namespace: dict[str, Any] = {}
    exec("def modèle() -> int:\n    return 1\n", namespace)  # a valid Python identifier

    with pytest.raises(StepDefinitionError, match="'è'.*name="):
        step(namespace["modèle"])
    assert step(name="modele")(namespace["modèle"]).name == "modele"


def test_step_output_name_that_used_to_collide_is_refused() -> None:
    # 'v#x' was stored under a key whose s3:// and memory:// URIs parse as output 'v'.
    @step
    def plain() -> Annotated[int, "v"]:
        return 1

    with pytest.raises(StepDefinitionError, match="'#'"):

        @step
        def hashed() -> tuple[Annotated[int, "v"], Annotated[int, "v#x"]]:
            return 1, 2

    with pytest.raises(StepDefinitionError, match="'#'"):
        step(_returning(Annotated[int, "v#x"]))
    assert list(plain.output_types) == ["v"]


@pytest.mark.parametrize(
    "good", ["v", "model_v2", "train-set", "weights.npy", "A.b-c_1", "x" * 200]
)
def test_step_output_names_with_letters_digits_dots_and_dashes_are_kept(good: str) -> None:
    assert list(step(_returning(Annotated[int, good])).output_types) == [good]
