"""Materializers round-trip through streams shaped like the artifact stores', and the registry picks them."""

from __future__ import annotations

import io
import logging
import math
import subprocess
import sys
import textwrap
from collections import OrderedDict
from typing import Annotated, Any, BinaryIO, Optional

import pytest

from zenml_workers.errors import MaterializerError
from zenml_workers.sdk.materializers import (
    BytesMaterializer,
    CloudpickleMaterializer,
    JsonMaterializer,
    Materializer,
    NumpyMaterializer,
    load_materializer,
    materializer_for_type,
    materializer_for_value,
    materializer_path,
    register_materializer,
    register_value_materializer,
    resolve_type,
    type_path,
)
from zenml_workers.sdk.materializers import registry as registry_module

#: Largest chunk the fake S3 body returns from one read(), in bytes.
SHORT_READ_BYTES = 64 * 1024


class WriteOnlyStream:
    """Mimics the artifact writer: write() and tell() only, never seekable."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self.writes = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self._buffer.write(data)
        self.writes += 1
        return n

    def tell(self) -> int:
        return self._buffer.tell()

    def seekable(self) -> bool:
        return False

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("the artifact writer is not seekable")

    def getvalue(self) -> bytes:
        return self._buffer.getvalue()


class ReadOnlyStream:
    """Mimics an S3 body: read(n) only, returning short reads, never seekable."""

    def __init__(self, data: bytes) -> None:
        self._buffer = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self._buffer.read()
        return self._buffer.read(min(n, SHORT_READ_BYTES))

    def seekable(self) -> bool:
        return False

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("the artifact reader is not seekable")


def round_trip(
    materializer: type[Materializer], value: Any, data_type: type | None = None
) -> tuple[Any, dict[str, Any], WriteOnlyStream]:
    writer = WriteOnlyStream()
    metadata = materializer().save(value, writer)  # type: ignore[arg-type]
    reader: BinaryIO = ReadOnlyStream(writer.getvalue())  # type: ignore[assignment]
    loaded = materializer().load(reader, data_type if data_type is not None else type(value))
    return loaded, metadata, writer


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register materializers without leaking them into other tests."""
    monkeypatch.setattr(registry_module, "_BY_TYPE", dict(registry_module._BY_TYPE))
    monkeypatch.setattr(registry_module, "_BY_VALUE", list(registry_module._BY_VALUE))


class Point:
    """A user type no materializer handles."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


class Point3(Point):
    pass


class PointMaterializer(Materializer):
    handles = ()

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        fp.write(f"{value.x},{value.y}".encode())
        return {}

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        x, y = fp.read().decode().split(",")
        return Point(int(x), int(y))


class OtherIntMaterializer(JsonMaterializer):
    pass


# --- builtins -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        0,
        -(2**70),
        1.5,
        "héllo ✓",
        True,
        None,
        [],
        (),
        [1, (2, "a"), [None, 2.5]],
        {"a": (1, (2, 3)), "b": [None, {"c": True}], "": 0},
    ],
)
def test_json_materializer_round_trips_plain_values(value: Any) -> None:
    loaded, metadata, _ = round_trip(JsonMaterializer, value)
    assert loaded == value
    assert type(loaded) is type(value)
    assert metadata["json_type"] == type(value).__name__


def test_json_materializer_keeps_nested_tuples_and_special_floats() -> None:
    loaded, _, _ = round_trip(JsonMaterializer, {"t": ((1,), [()]), "inf": math.inf})
    assert loaded == {"t": ((1,), [()]), "inf": math.inf}
    assert type(loaded["t"][0]) is tuple and type(loaded["t"][1][0]) is tuple


@pytest.mark.parametrize(
    "value",
    [
        {"a": object()},
        {1: "int key"},
        [b"bytes"],
        {"__zw_tuple__": [1]},
        OrderedDict(a=1),
        type("MyStr", (str,), {})("x"),
    ],
)
def test_json_materializer_refuses_values_it_cannot_return_unchanged(value: Any) -> None:
    assert not JsonMaterializer().can_save(value)
    with pytest.raises(MaterializerError):
        JsonMaterializer().save(value, WriteOnlyStream())  # type: ignore[arg-type]


def test_json_materializer_load_rejects_garbage() -> None:
    with pytest.raises(MaterializerError, match="not valid JSON"):
        JsonMaterializer().load(ReadOnlyStream(b"\x80not json"), None)  # type: ignore[arg-type]


def test_bytes_materializer_round_trips_bytes() -> None:
    value = bytes(range(256)) * 1000
    loaded, metadata, _ = round_trip(BytesMaterializer, value)
    assert loaded == value
    assert metadata == {"size_bytes": len(value)}


# --- pickle fallback ---------------------------------------------------------------------------


def test_cloudpickle_materializer_round_trips_objects_and_lambdas() -> None:
    value = {"point": Point(1, 2), "f": lambda x: x + 1}
    loaded, _, _ = round_trip(CloudpickleMaterializer, value)
    assert loaded["point"] == Point(1, 2)
    assert loaded["f"](1) == 2
    assert CloudpickleMaterializer.safe is False


def test_cloudpickle_materializer_load_rejects_garbage() -> None:
    with pytest.raises(MaterializerError, match="not a valid pickle"):
        CloudpickleMaterializer().load(ReadOnlyStream(b"garbage"), None)  # type: ignore[arg-type]


# --- numpy --------------------------------------------------------------------------------------


def _arrays() -> list[Any]:
    np = pytest.importorskip("numpy")
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    return [
        base,
        np.asfortranarray(base),
        base[::2, ::3],
        np.array(3.5),
        np.zeros((0, 3), dtype=np.int16),
        np.array([True, False]),
        np.array(["a", "héllo"]),
        np.array([(1, 2.0)], dtype=[("i", "i4"), ("f", "f8")]),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
    ]


@pytest.mark.parametrize("index", range(9))
def test_numpy_materializer_round_trips_arrays(index: int) -> None:
    np = pytest.importorskip("numpy")
    arr = _arrays()[index]
    loaded, metadata, _ = round_trip(NumpyMaterializer, arr)
    assert type(loaded) is np.ndarray
    assert loaded.dtype == arr.dtype
    np.testing.assert_array_equal(loaded, arr)
    assert metadata["shape"] == list(arr.shape)


def test_numpy_materializer_streams_large_arrays_in_chunks() -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(5 * 1024 * 1024, dtype=np.float64)  # 40 MiB: several 16 MiB write chunks
    loaded, metadata, writer = round_trip(NumpyMaterializer, arr)
    assert writer.writes > 2  # header + several chunks, never one full-size copy
    assert metadata["size_bytes"] == arr.nbytes
    np.testing.assert_array_equal(loaded, arr)


class CountingSink:
    """A writer that keeps only a byte count, so memory measurements see the materializer alone."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def tell(self) -> int:
        return self.size


def test_numpy_materializer_never_holds_a_second_full_copy() -> None:
    np = pytest.importorskip("numpy")
    import tracemalloc

    arr = np.ones(8 * 1024 * 1024, dtype=np.float64)  # 64 MiB, four write chunks
    writer = WriteOnlyStream()
    NumpyMaterializer().save(arr, writer)  # type: ignore[arg-type]
    data = writer.getvalue()
    del writer

    tracemalloc.start()
    try:
        NumpyMaterializer().save(arr, CountingSink())  # type: ignore[arg-type]
        _, save_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded = NumpyMaterializer().load(ReadOnlyStream(data), np.ndarray)  # type: ignore[arg-type]
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert save_peak < arr.nbytes // 2  # chunks of 16 MiB, not a 64 MiB copy
    assert load_peak < arr.nbytes * 5 // 4  # the result plus one read buffer
    np.testing.assert_array_equal(loaded, arr)


def test_numpy_materializer_returns_scalars_as_scalars() -> None:
    np = pytest.importorskip("numpy")
    loaded, _, _ = round_trip(NumpyMaterializer, np.float32(2.5))
    assert type(loaded) is np.float32 and loaded == np.float32(2.5)
    assert materializer_for_value(np.int64(3)) is NumpyMaterializer
    assert materializer_for_value(np.float64(3)) is NumpyMaterializer  # not JSON, though a float


def test_numpy_materializer_refuses_object_arrays_so_they_fall_back_to_pickle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    np = pytest.importorskip("numpy")
    arr = np.array([{"a": 1}, None], dtype=object)
    assert not NumpyMaterializer().can_save(arr)
    assert not NumpyMaterializer().can_save(np.ma.masked_array([1, 2], mask=[0, 1]))
    with caplog.at_level(logging.WARNING, logger="zenml_workers.materializers"):
        assert materializer_for_value(arr, declared=NumpyMaterializer) is CloudpickleMaterializer
    assert "numpy.ndarray" in caplog.text


def test_numpy_materializer_load_rejects_truncated_stream() -> None:
    np = pytest.importorskip("numpy")
    writer = WriteOnlyStream()
    NumpyMaterializer().save(np.arange(1000), writer)  # type: ignore[arg-type]
    truncated = ReadOnlyStream(writer.getvalue()[:-10])
    with pytest.raises(MaterializerError, match=r"\.npy"):
        NumpyMaterializer().load(truncated, np.ndarray)  # type: ignore[arg-type]


# --- pandas -------------------------------------------------------------------------------------


def test_dataframe_materializer_round_trips_index_and_dtypes() -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from zenml_workers.sdk.materializers import DataFrameMaterializer

    df = pd.DataFrame(
        {
            "i": [1, 2, 3],
            "f": [0.5, None, 2.0],
            "s": ["x", None, "z"],
            "t": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]),
            "c": pd.Categorical(["a", "b", "a"]),
        },
        index=pd.Index([10, 20, 30], name="key"),
    )
    loaded, metadata, _ = round_trip(DataFrameMaterializer, df)
    pd.testing.assert_frame_equal(loaded, df)
    assert metadata["rows"] == 3 and metadata["columns"] == ["i", "f", "s", "t", "c"]
    assert materializer_for_value(df) is DataFrameMaterializer


def test_series_materializer_round_trips_name_and_index() -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from zenml_workers.sdk.materializers import SeriesMaterializer

    for name in ("price", None, 3):
        series = pd.Series([1.5, 2.5], index=pd.Index(["a", "b"], name="k"), name=name)
        loaded, _, _ = round_trip(SeriesMaterializer, series)
        pd.testing.assert_series_equal(loaded, series)
    assert materializer_for_value(series) is SeriesMaterializer


def test_dataframe_materializer_refuses_frames_parquet_would_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pd = pytest.importorskip("pandas")
    from zenml_workers.sdk.materializers import DataFrameMaterializer

    int_columns = pd.DataFrame({0: [1], 1: [2]})
    mixed_objects = pd.DataFrame({"a": [{"k": 1}, 3]})
    for df in (int_columns, mixed_objects):
        assert not DataFrameMaterializer().can_save(df)
    with caplog.at_level(logging.WARNING, logger="zenml_workers.materializers"):
        chosen = materializer_for_value(mixed_objects, declared=DataFrameMaterializer)
    assert chosen is CloudpickleMaterializer
    loaded, _, _ = round_trip(chosen, mixed_objects)
    pd.testing.assert_frame_equal(loaded, mixed_objects)


# --- torch --------------------------------------------------------------------------------------


def test_torch_tensor_materializer_round_trips_dtypes_and_views() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from zenml_workers.sdk.materializers import TorchTensorMaterializer

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for tensor in (base, base.t(), base.to(torch.bfloat16), torch.tensor(7), torch.empty(0, 2)):
        loaded, metadata, _ = round_trip(TorchTensorMaterializer, tensor)
        assert type(loaded) is torch.Tensor and loaded.dtype == tensor.dtype
        assert torch.equal(loaded, tensor)
        assert metadata["shape"] == list(tensor.shape)
    param = torch.nn.Parameter(torch.ones(2))
    loaded, _, _ = round_trip(TorchTensorMaterializer, param)
    assert isinstance(loaded, torch.nn.Parameter) and torch.equal(loaded, param)
    assert materializer_for_value(param) is TorchTensorMaterializer  # via the MRO


def test_torch_state_dict_round_trips_when_declared_as_dict() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from zenml_workers.sdk.materializers import TorchStateDictMaterializer

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = model.state_dict()
    declared = materializer_for_type(dict[str, torch.Tensor])  # type: ignore[name-defined]
    assert declared is JsonMaterializer  # dict's materializer, which must decline tensors
    chosen = materializer_for_value(state, declared=declared)
    assert chosen is TorchStateDictMaterializer
    loaded, metadata, _ = round_trip(chosen, state)
    assert type(loaded) is OrderedDict and list(loaded) == list(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor) and loaded[key].dtype == tensor.dtype
    assert metadata["tensors"] == len(state)
    assert materializer_for_value({"w": torch.ones(2)}) is TorchStateDictMaterializer


def test_torch_state_dict_stores_tensors_that_share_memory() -> None:
    torch = pytest.importorskip("torch")
    from zenml_workers.sdk.materializers import TorchStateDictMaterializer

    fused = torch.arange(12.0).reshape(3, 4)
    shared = {"fused": fused, "q": fused[0], "tied": fused}
    loaded, _, _ = round_trip(TorchStateDictMaterializer, shared, dict)
    assert type(loaded) is dict and list(loaded) == ["fused", "q", "tied"]
    for key, tensor in shared.items():
        assert torch.equal(loaded[key], tensor)


def test_torch_state_dict_materializer_declines_mixed_dicts() -> None:
    torch = pytest.importorskip("torch")
    from zenml_workers.sdk.materializers import TorchStateDictMaterializer

    assert not TorchStateDictMaterializer().can_save({"w": torch.ones(1), "step": 3})
    assert not TorchStateDictMaterializer().can_save({1: torch.ones(1)})
    assert not TorchStateDictMaterializer().can_save({})


try:
    import torch as _torch
except ImportError:  # the torch tests skip themselves
    _torch = None  # type: ignore[assignment]

if _torch is not None:

    class TiedNet(_torch.nn.Module):
        """Embedding and head share one weight, plus a buffer: ties must survive a round trip."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = _torch.nn.Embedding(5, 4)
            self.head = _torch.nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("scale", _torch.tensor(2.0))

        def forward(self, ids: Any) -> Any:
            return self.head(self.embed(ids)) * self.scale


def test_torch_module_materializer_round_trips_a_linear_layer() -> None:
    torch = pytest.importorskip("torch")
    from zenml_workers.sdk.materializers import TorchModuleMaterializer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    assert materializer_for_value(model) is TorchModuleMaterializer
    assert materializer_for_type(torch.nn.Sequential) is TorchModuleMaterializer
    loaded, metadata, _ = round_trip(TorchModuleMaterializer, model)
    x = torch.randn(5, 4)
    assert type(loaded) is torch.nn.Sequential
    assert torch.equal(loaded(x), model(x))
    assert all(isinstance(p, torch.nn.Parameter) for p in loaded.parameters())
    assert metadata["parameters"] == sum(p.numel() for p in model.parameters())
    assert TorchModuleMaterializer.safe is False


def test_torch_module_materializer_keeps_tied_weights_and_buffers() -> None:
    torch = pytest.importorskip("torch")
    from zenml_workers.sdk.materializers import TorchModuleMaterializer

    model = TiedNet()
    loaded, _, _ = round_trip(TorchModuleMaterializer, model)
    ids = torch.tensor([0, 3, 4])
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded.scale, torch.tensor(2.0))


def test_torch_module_defined_in_main_loads_in_another_process(tmp_path: Any) -> None:
    pytest.importorskip("torch")
    script = textwrap.dedent(
        """
        import sys, torch
        from zenml_workers.sdk.materializers import TorchModuleMaterializer

        class Doubler(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(2, 2)
            def forward(self, x):
                return 2 * self.lin(x)

        torch.manual_seed(0)
        model = Doubler()
        with open(sys.argv[1], "wb") as f:
            TorchModuleMaterializer().save(model, f)
        torch.save(model(torch.ones(1, 2)).detach(), sys.argv[2])
        """
    )
    artifact, expected = tmp_path / "module.bin", tmp_path / "expected.pt"
    subprocess.run(
        [sys.executable, "-c", script, str(artifact), str(expected)], check=True, timeout=120
    )
    import torch

    from zenml_workers.sdk.materializers import TorchModuleMaterializer

    loaded = TorchModuleMaterializer().load(ReadOnlyStream(artifact.read_bytes()), None)  # type: ignore[arg-type]
    assert type(loaded).__name__ == "Doubler"
    assert torch.equal(loaded(torch.ones(1, 2)), torch.load(expected))


def test_torch_module_materializer_rejects_other_streams() -> None:
    pytest.importorskip("torch")
    from zenml_workers.sdk.materializers import TorchModuleMaterializer

    with pytest.raises(MaterializerError, match="not a module"):
        TorchModuleMaterializer().load(ReadOnlyStream(b"x" * 64), None)  # type: ignore[arg-type]


# --- registry -----------------------------------------------------------------------------------


def test_materializer_for_type_unwraps_annotations() -> None:
    np = pytest.importorskip("numpy")
    assert materializer_for_type(int) is JsonMaterializer
    assert materializer_for_type(bool) is JsonMaterializer
    assert materializer_for_type(list[int]) is JsonMaterializer
    assert materializer_for_type(Optional[dict[str, int]]) is JsonMaterializer
    assert materializer_for_type(Annotated[np.ndarray, "features"]) is NumpyMaterializer
    assert materializer_for_type(bytes | None) is BytesMaterializer


@pytest.mark.parametrize("annotation", [Any, None, type(None), int | str, "np.ndarray", object])
def test_materializer_for_type_leaves_loose_annotations_to_run_time(annotation: Any) -> None:
    assert materializer_for_type(annotation) is None


def test_materializer_for_value_decides_at_run_time_for_any() -> None:
    np = pytest.importorskip("numpy")
    assert materializer_for_type(Any) is None
    assert materializer_for_value(np.zeros(2), declared=None) is NumpyMaterializer
    assert materializer_for_value({"a": 1}, declared=None) is JsonMaterializer
    assert materializer_for_value(b"x") is BytesMaterializer


def test_registry_uses_the_mro_for_subclasses_of_registered_types(isolated_registry: None) -> None:
    register_materializer(Point, PointMaterializer)
    assert materializer_for_type(Point3) is PointMaterializer
    assert materializer_for_value(Point3(1, 2)) is PointMaterializer
    loaded, _, _ = round_trip(PointMaterializer, Point3(1, 2))
    assert loaded == Point(1, 2)


def test_registry_user_registration_overrides_builtin(isolated_registry: None) -> None:
    register_materializer(int, OtherIntMaterializer)
    assert materializer_for_type(int) is OtherIntMaterializer
    assert materializer_for_value(5) is OtherIntMaterializer
    register_materializer(f"{__name__}.Point", PointMaterializer)  # by name, without the class
    assert materializer_for_value(Point(0, 0)) is PointMaterializer


def test_registry_consults_value_materializers_before_the_fallback(
    isolated_registry: None,
) -> None:
    class PointListMaterializer(PointMaterializer):
        def can_save(self, value: Any) -> bool:
            return isinstance(value, list) and all(isinstance(v, Point) for v in value)

    register_value_materializer(PointListMaterializer)
    assert materializer_for_value([Point(1, 1)], declared=JsonMaterializer) is PointListMaterializer
    assert materializer_for_value([1]) is JsonMaterializer


def test_registry_falls_back_to_cloudpickle_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="zenml_workers.materializers"):
        chosen = materializer_for_value(Point(1, 2))
    assert chosen is CloudpickleMaterializer
    [record] = [r for r in caplog.records if r.name == "zenml_workers.materializers"]
    assert record.levelno == logging.WARNING
    assert f"{__name__}.Point" in record.getMessage()
    assert "register_materializer(Point" in record.getMessage()
    loaded, _, _ = round_trip(chosen, Point(1, 2))
    assert loaded == Point(1, 2)


def test_registry_keeps_a_declared_materializer_that_can_save(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="zenml_workers.materializers"):
        assert (
            materializer_for_value(3, declared=CloudpickleMaterializer) is CloudpickleMaterializer
        )
    assert not caplog.records


def test_register_materializer_rejects_non_materializers() -> None:
    with pytest.raises(MaterializerError, match="not a Materializer subclass"):
        register_materializer(int, int)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cls", [JsonMaterializer, BytesMaterializer, NumpyMaterializer, CloudpickleMaterializer]
)
def test_materializer_path_round_trips_through_load_materializer(cls: type[Materializer]) -> None:
    path = materializer_path(cls)
    assert ":" in path
    assert load_materializer(path) is cls


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_colon", "not of the form"),
        ("no_such_module_zw:Thing", "Cannot import"),
        ("zenml_workers.sdk.materializers.builtins:Nope", "has no materializer"),
        ("builtins:int", "not a Materializer subclass"),
        ("tests.unit.test_materializers:f.<locals>.M", "inside a function"),
    ],
)
def test_load_materializer_explains_bad_paths(path: str, message: str) -> None:
    with pytest.raises(MaterializerError, match=message):
        load_materializer(path)


def test_type_path_and_resolve_type_round_trip() -> None:
    np = pytest.importorskip("numpy")
    assert type_path(int) == "builtins:int"
    assert type_path(Optional[int]) == "builtins:int"
    assert type_path(list[int]) == "builtins:list"
    assert type_path(np.ndarray) == "numpy:ndarray"
    assert resolve_type(type_path(np.ndarray)) is np.ndarray
    assert resolve_type(type_path(Point3)) is Point3
    assert resolve_type(type_path(type(None))) is type(None)
    assert type_path(Any) == "typing:Any" and resolve_type("typing:Any") is None
    assert resolve_type("no_such_module_zw:Thing") is None
    assert resolve_type("builtins:len") is None

    class Local:
        pass

    assert resolve_type(type_path(Local)) is None


def test_importing_materializers_imports_no_optional_library() -> None:
    code = textwrap.dedent(
        """
        import sys
        import zenml_workers.sdk.materializers as m
        m.materializer_for_type(dict[str, int])
        m.materializer_for_value({"a": 1})
        m.materializer_for_value({"a": {1: 2}})  # falls through the state-dict sniffer
        heavy = ("numpy", "pandas", "torch", "pyarrow", "safetensors")
        print(",".join(sorted(name for name in heavy if name in sys.modules)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
