"""Unit tests for verified reads: every byte of an artifact is checked against its recorded hash.

Run on the memory and local stores. Each case writes an object, then (for the corrupt
cases) changes its stored bytes behind the store's back, and reads it the ways
materializers do: all at once, in pieces, partially, seeking, through ``readinto``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stores.artifacts import (
    ArtifactIntegrityError,
    ArtifactStore,
    ArtifactStoreError,
    LocalArtifactStore,
    MemoryArtifactStore,
    StoredObject,
    VerifyingReader,
    integrity,
)
from stores.errors import InfrastructureError
from zenml_workers.errors import MaterializerError
from zenml_workers.sdk.materializers import (
    BytesMaterializer,
    CloudpickleMaterializer,
    DataFrameMaterializer,
    JsonMaterializer,
    Materializer,
    NumpyMaterializer,
    TorchTensorMaterializer,
)

MiB = 1024 * 1024
DATA = bytes(range(256)) * 4099  # 1,049,344 bytes: just over 1 MiB, not a power of two


@pytest.fixture(autouse=True, params=["inline", "threaded"])
def hashing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each case twice: hashed on the reading thread, and on the helper thread after 1 KiB."""
    if request.param == "threaded":
        monkeypatch.setattr(integrity, "INLINE_HASH_BYTES", 1024)
    return str(request.param)


@dataclass
class Backend:
    """A store plus a way to replace an object's stored bytes without the store knowing."""

    store: ArtifactStore
    replace: Callable[[str, bytes], None]


@pytest.fixture(params=["memory", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        store = MemoryArtifactStore(f"integrity-{uuid.uuid4().hex}")

        def replace_memory(uri: str, data: bytes) -> None:
            store.objects[uri.split("/", 3)[3]] = data

        yield Backend(store, replace_memory)
        store.clear()
    else:
        local = LocalArtifactStore(tmp_path / "artifacts")

        def replace_local(uri: str, data: bytes) -> None:
            local.path_for(uri).write_bytes(data)

        yield Backend(local, replace_local)


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def _put(backend: Backend, data: bytes = DATA, key: str = "r/s.1.out") -> StoredObject:
    return backend.store.put_bytes(key, data)


def _open(backend: Backend, stored: StoredObject, *, sized: bool = True) -> Any:
    return backend.store.verified_reader(
        stored.uri,
        expected_hash=stored.content_hash,
        expected_size_bytes=stored.size_bytes if sized else None,
    )


def _read_in_pieces(fp: Any, piece_bytes: int) -> bytes:
    pieces = []
    while piece := fp.read(piece_bytes):
        pieces.append(piece)
    return b"".join(pieces)


# -- intact objects ----------------------------------------------------------------------------


def test_verified_reader_reads_an_intact_object_whole_and_in_pieces(backend: Backend) -> None:
    stored = _put(backend)

    with _open(backend, stored) as fp:
        assert fp.read() == DATA
        assert fp.verified
    with _open(backend, stored) as fp:
        assert _read_in_pieces(fp, 10_000) == DATA
        assert fp.verified


def test_verified_reader_exact_size_read_is_checked_when_the_block_ends(backend: Backend) -> None:
    stored = _put(backend)

    with _open(backend, stored) as fp:
        assert fp.read(len(DATA)) == DATA
        assert not fp.verified  # the end has not been seen yet: a longer object could follow
    assert fp.verified
    assert fp.closed


def test_verified_reader_empty_object_verifies(backend: Backend) -> None:
    stored = _put(backend, b"")

    with _open(backend, stored) as fp:
        assert fp.read(10) == b""
        assert fp.verified


def test_verified_reader_partial_read_hashes_the_rest_on_exit(backend: Backend) -> None:
    stored = _put(backend)

    with _open(backend, stored) as fp:
        assert fp.read(7) == DATA[:7]
    assert fp.verified


def test_verified_reader_seeks_forward_backward_and_to_the_end(backend: Backend) -> None:
    stored = _put(backend)

    with _open(backend, stored) as fp:
        assert fp.seekable()
        assert fp.read(4) == DATA[:4]
        assert fp.seek(700_000) == 700_000
        assert fp.tell() == 700_000
        assert fp.read(10) == DATA[700_000:700_010]
        fp.seek(3)
        assert fp.read(3) == DATA[3:6]
        fp.seek(-5, io.SEEK_END)
        assert fp.read() == DATA[-5:]
        assert fp.verified
        fp.seek(100)
        assert fp.read(2) == DATA[100:102]  # reading again after the check still works


def test_verified_reader_seek_past_the_end_reads_nothing(backend: Backend) -> None:
    stored = _put(backend)

    with _open(backend, stored) as fp:
        fp.seek(len(DATA) + 100)
        assert fp.read(10) == b""
        assert fp.verified


def test_verified_reader_readinto_readline_and_read1(backend: Backend) -> None:
    text = b"first line\nsecond line\n" + DATA
    stored = _put(backend, text)

    with _open(backend, stored) as fp:
        assert fp.readline() == b"first line\n"
        assert fp.read1(6) == b"second"
        buffer = bytearray(6)
        assert fp.readinto(buffer) == 6
        assert bytes(buffer) == b" line\n"
    assert fp.verified


def test_verified_reader_does_not_copy_the_object_when_draining(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    stored = store.put_bytes("r/s.1.big", b"\x07" * (32 * MiB))

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with store.verified_reader(stored.uri, expected_hash=stored.content_hash) as fp:
            fp.read(10)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fp.verified
    assert peak_bytes < 8 * MiB, peak_bytes  # a few 1 MiB chunks in flight, not the object


class _Interrupted(BaseException):
    """Stands for KeyboardInterrupt or SystemExit, which must not wait for the rest."""


def test_verified_reader_leaves_no_helper_thread_behind(backend: Backend) -> None:
    import threading

    stored = _put(backend)
    before = threading.active_count()

    with _open(backend, stored) as fp:
        fp.read(300_000)
    with pytest.raises(_Interrupted), _open(backend, stored) as fp:
        fp.read(300_000)
        raise _Interrupted
    with pytest.raises(ValueError), _open(backend, stored) as fp:
        fp.read(300_000)
        raise ValueError("consumer failed")

    assert threading.active_count() == before


# -- corrupt objects ---------------------------------------------------------------------------


@pytest.mark.parametrize("at", [0, len(DATA) // 2, len(DATA) - 1], ids=["first", "middle", "last"])
def test_verified_reader_refuses_a_flipped_byte_read_whole(backend: Backend, at: int) -> None:
    stored = _put(backend)
    backend.replace(stored.uri, _flipped(DATA, at))

    with pytest.raises(ArtifactIntegrityError) as info, _open(backend, stored) as fp:
        fp.read()

    err = info.value
    assert err.uri == stored.uri
    assert err.expected_hash == stored.content_hash
    assert err.actual_hash == _sha256(_flipped(DATA, at))
    assert err.expected_size_bytes == err.actual_size_bytes == len(DATA)
    assert (
        stored.uri in str(err) and stored.content_hash in str(err) and err.actual_hash in str(err)
    )
    assert "enable_cache=False" in str(err)


@pytest.mark.parametrize("at", [5, len(DATA) - 1], ids=["in-read-part", "in-unread-part"])
def test_verified_reader_refuses_a_flipped_byte_after_a_partial_read(
    backend: Backend, at: int
) -> None:
    stored = _put(backend)
    backend.replace(stored.uri, _flipped(DATA, at))

    with pytest.raises(ArtifactIntegrityError), _open(backend, stored) as fp:
        fp.read(10)  # the consumer stops early (numpy, pickle); the exit reads the rest


def test_verified_reader_refuses_a_flipped_byte_the_consumer_seeked_over(backend: Backend) -> None:
    stored = _put(backend)
    backend.replace(stored.uri, _flipped(DATA, 1000))

    with pytest.raises(ArtifactIntegrityError), _open(backend, stored) as fp:
        fp.read(10)
        fp.seek(500_000)
        fp.read()  # the skipped bytes, with the flipped one, are hashed before this read


@pytest.mark.parametrize("keep", [0, 1, len(DATA) - 1], ids=["empty", "one-byte", "one-short"])
@pytest.mark.parametrize("sized", [True, False], ids=["size-known", "hash-only"])
def test_verified_reader_refuses_a_truncated_object(
    backend: Backend, keep: int, sized: bool
) -> None:
    stored = _put(backend)
    backend.replace(stored.uri, DATA[:keep])

    with pytest.raises(ArtifactIntegrityError) as info, _open(backend, stored, sized=sized) as fp:
        assert fp.read() == DATA[:keep]

    assert info.value.actual_size_bytes == keep
    if sized:
        assert f"{keep} bytes where {len(DATA)} were written" in str(info.value)


def test_verified_reader_refuses_an_object_with_bytes_appended(backend: Backend) -> None:
    stored = _put(backend)
    backend.replace(stored.uri, DATA + b"\x00")

    with pytest.raises(ArtifactIntegrityError, match="truncated or replaced"):  # noqa: SIM117
        with _open(backend, stored) as fp:
            assert fp.read(len(DATA)) == DATA  # every recorded byte is intact


def test_verified_reader_names_corruption_in_place_of_the_consumers_error(
    backend: Backend,
) -> None:
    stored = _put(backend)
    backend.replace(stored.uri, _flipped(DATA, 3))

    with pytest.raises(ArtifactIntegrityError) as info, _open(backend, stored) as fp:
        fp.read(4)
        raise ValueError("bad header")  # what a parser says about the corrupt bytes

    assert isinstance(info.value.__cause__, ValueError)


def test_verified_reader_keeps_the_consumers_error_on_an_intact_object(backend: Backend) -> None:
    stored = _put(backend)

    with pytest.raises(ValueError, match="the consumer's own bug"), _open(backend, stored) as fp:
        fp.read(4)
        raise ValueError("the consumer's own bug")


def test_verified_reader_refuses_an_unknown_hash_format(backend: Backend) -> None:
    stored = _put(backend)

    with pytest.raises(ArtifactStoreError, match="sha256:<hex>") as info:  # noqa: SIM117
        with backend.store.verified_reader(stored.uri, expected_hash="md5:abc"):
            pass
    assert not isinstance(info.value, ArtifactIntegrityError)


def test_verifying_reader_over_a_non_seekable_stream_refuses_to_seek() -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            return self._data.readinto(buffer)

    fp = VerifyingReader(Pipe(b"abc"), uri="pipe://x", expected_hash=_sha256(b"abc"))  # type: ignore[arg-type]
    assert not fp.seekable()
    with pytest.raises(io.UnsupportedOperation):
        fp.seek(1)
    assert fp.read() == b"abc"
    assert fp.verified


# -- the error ---------------------------------------------------------------------------------


def test_integrity_error_is_a_store_error_that_is_never_retried() -> None:
    assert issubclass(ArtifactIntegrityError, ArtifactStoreError)
    assert not issubclass(ArtifactIntegrityError, InfrastructureError)


def test_integrity_error_names_origin_and_survives_pickling() -> None:
    err = ArtifactIntegrityError(
        uri="s3://b/run-1/train.1.model",
        expected_hash="sha256:" + "a" * 64,
        actual_hash="sha256:" + "b" * 64,
        expected_size_bytes=10,
        actual_size_bytes=10,
    ).with_origin(
        artifact_id="art-1",
        artifact_name="model",
        run_id="run-1",
        step="train",
        consumer="input 'model' of step 'evaluate'",
        recorded=True,
    )

    message = str(err)
    assert message.startswith("Input 'model' of step 'evaluate' cannot be loaded: artifact 'model'")
    for part in ("art-1", "s3://b/run-1/train.1.model", "step 'train' of run run-1", "a" * 64):
        assert part in message, part
    assert "never taken as a cache hit" in message
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ArtifactIntegrityError
    assert str(again) == message
    assert again.step == "train" and again.recorded


# -- through every materializer ----------------------------------------------------------------


def _values() -> list[tuple[type[Materializer], Any]]:
    import numpy as np
    import pandas as pd
    import torch

    return [
        (JsonMaterializer, {"values": list(range(2000))}),
        (BytesMaterializer, DATA),
        (NumpyMaterializer, np.arange(50_000, dtype=np.int64)),
        (CloudpickleMaterializer, {"nested": [set(range(100))] * 10}),
        (
            DataFrameMaterializer,
            pd.DataFrame({"a": range(5000), "b": [str(i) for i in range(5000)]}),
        ),
        (TorchTensorMaterializer, torch.arange(20_000, dtype=torch.float32)),
    ]


def _equal(a: Any, b: Any) -> bool:
    import numpy as np
    import pandas as pd
    import torch

    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    if isinstance(a, pd.DataFrame):
        return bool(a.equals(b))
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a, b))
    return bool(a == b)


@pytest.mark.parametrize(
    "index", range(6), ids=["json", "bytes", "numpy", "pickle", "parquet", "torch"]
)
@pytest.mark.parametrize("damage", ["intact", "flip-first", "flip-middle", "flip-last", "truncate"])
def test_every_materializer_loads_only_intact_bytes(
    backend: Backend, index: int, damage: str
) -> None:
    pytest.importorskip("pandas")
    pytest.importorskip("torch")
    cls, value = _values()[index]
    with backend.store.writer(f"r/s.1.{cls.__name__}") as w:
        cls().save(value, w)  # type: ignore[arg-type]
    stored = w.result
    assert stored is not None
    data = backend.store.get_bytes(stored.uri)
    damaged = {
        "intact": data,
        "flip-first": _flipped(data, 0),
        "flip-middle": _flipped(data, len(data) // 2),
        "flip-last": _flipped(data, len(data) - 1),
        "truncate": data[: len(data) // 2],
    }[damage]
    backend.replace(stored.uri, damaged)

    def load() -> Any:
        with _open(backend, stored) as fp:
            return cls().load(fp, type(value))

    if damage == "intact":
        assert _equal(value, load())
        return
    with pytest.raises(ArtifactIntegrityError) as info:
        load()
    # Whatever the materializer made of the bytes (an error, a wrong value), the cause is named.
    assert not isinstance(info.value, MaterializerError)


# -- the worker ---------------------------------------------------------------------------------


def test_worker_load_inputs_names_the_corrupt_input_and_its_producer() -> None:
    from scheduler.specs import InputRef, InputSpec, StepSpec
    from stores.metadata.queries import ArtifactRef
    from zenml_workers.worker.inputs import load_inputs as _load_inputs

    store = MemoryArtifactStore(f"integrity-{uuid.uuid4().hex}")
    stored = store.put_bytes("run-1/produce.1.values", b"[1,2,3]")
    store.objects["run-1/produce.1.values"] = b"[1,2,4]"  # still valid JSON
    json_path = "zenml_workers.sdk.materializers.builtins:JsonMaterializer"
    ref = ArtifactRef("art-1", stored.content_hash, stored.uri, json_path, "builtins:list")
    spec = StepSpec(
        invocation_id="consume",
        name="consume",
        code_hash="sha256:c",
        source_hash="sha256:s",
        inputs=(InputSpec("values", (InputRef("produce", "values"),)),),
    )

    with pytest.raises(ArtifactIntegrityError) as info:
        _load_inputs(spec, {("produce", "values"): ref}, store)

    err = info.value
    assert (err.artifact_id, err.artifact_name, err.step) == ("art-1", "values", "produce")
    assert str(err).startswith(
        "Input 'values' of step 'consume' cannot be loaded: artifact 'values'"
    )
    assert not err.recorded  # no metadata store given: nothing could be marked
    store.objects["run-1/produce.1.values"] = b"[1,2,3]"
    assert _load_inputs(spec, {("produce", "values"): ref}, store) == {"values": [1, 2, 3]}
    store.clear()
