"""One contract for every artifact store: local folder, memory, and S3 on a real SeaweedFS.

Each test runs against every backend through the ``backend`` fixture. ``Backend.listing``
shows what is physically below the store's root, including temporary files and
unfinished multipart uploads, so the abort tests can prove nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stores.artifacts import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ArtifactStore,
    ArtifactStoreCredentialsError,
    ArtifactStoreError,
    LocalArtifactStore,
    MemoryArtifactStore,
    S3ArtifactStore,
    artifact_store_from_uri,
)
from tests.services.s3 import S3Server

MiB = 1024 * 1024
PART_SIZE_BYTES = 5 * MiB


@dataclass
class Backend:
    """A store under test plus a way to see everything below its root.

    Attributes:
        name: ``local``, ``memory`` or ``s3``.
        store: The store, rooted in a fresh place for this test, with 5 MiB parts on S3.
        listing: Returns every object, temporary file and pending upload below the root.
        sibling: Returns another store of the same scheme with a different root.
    """

    name: str
    store: ArtifactStore
    listing: Callable[[], list[str]]
    sibling: Callable[[], ArtifactStore]


def _local_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "artifacts"

    def listing() -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())

    return Backend(
        "local",
        LocalArtifactStore(root),
        listing,
        lambda: LocalArtifactStore(tmp_path / "other"),
    )


def _memory_backend() -> Backend:
    name = f"contract-{uuid.uuid4().hex}"
    store = MemoryArtifactStore(name)
    return Backend(
        "memory",
        store,
        lambda: sorted(store.objects),
        lambda: MemoryArtifactStore(f"{name}-other"),
    )


def _s3_store(server: S3Server, root_uri: str, **overrides: Any) -> ArtifactStore:
    kwargs: dict[str, Any] = {
        "endpoint_url": server.endpoint_url,
        "access_key_id": server.access_key_id,
        "secret_access_key": server.secret_access_key,
        "region": server.region,
    }
    kwargs.update(overrides)
    store = artifact_store_from_uri(root_uri, **kwargs)
    assert isinstance(store, S3ArtifactStore)
    store.part_size_bytes = PART_SIZE_BYTES
    return store


def _s3_backend(server: S3Server) -> Backend:
    bucket = server.make_bucket()
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    client = server.client()

    def listing() -> list[str]:
        keys = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        return sorted([k["Key"] for k in keys] + [f"upload:{u['Key']}" for u in uploads])

    return Backend(
        "s3",
        _s3_store(server, f"s3://{bucket}/{prefix}"),
        listing,
        lambda: _s3_store(server, f"s3://{server.make_bucket()}/elsewhere"),
    )


def _backends(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield _local_backend(tmp_path)
    elif request.param == "memory":
        backend = _memory_backend()
        yield backend
        assert isinstance(backend.store, MemoryArtifactStore)
        backend.store.clear()
    else:
        yield _s3_backend(request.getfixturevalue("s3_server"))


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.services)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backends(request, tmp_path)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def streaming_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The backends that stream to storage (the memory store keeps every byte by design)."""
    yield from _backends(request, tmp_path)


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _write_in_chunks(store: ArtifactStore, key: str, data: bytes, chunk_bytes: int) -> Any:
    with store.writer(key) as w:
        for start in range(0, len(data), chunk_bytes):
            w.write(data[start : start + chunk_bytes])
            assert w.tell() == min(start + chunk_bytes, len(data))
    return w.result


# -- round trips ------------------------------------------------------------------


def test_artifact_store_round_trip_returns_uri_size_and_hash(backend: Backend) -> None:
    data = b"zenml-workers artifact \x00\xff" * 10
    stored = backend.store.put_bytes("runs/r1/step/1/output", data)

    assert stored.uri.startswith(backend.store.root_uri + "/")
    assert stored.uri.endswith("/runs/r1/step/1/output")
    assert stored.size_bytes == len(data)
    assert stored.content_hash == _sha256(data)
    assert backend.store.exists(stored.uri)
    assert backend.store.get_bytes(stored.uri) == data


def test_artifact_store_writer_streams_and_reader_reads_in_pieces(backend: Backend) -> None:
    data = os.urandom(300_001)
    stored = _write_in_chunks(backend.store, "runs/r/s/1/stream", data, chunk_bytes=65_537)

    assert stored.size_bytes == len(data)
    assert stored.content_hash == _sha256(data)
    pieces = []
    with backend.store.reader(stored.uri) as f:
        while piece := f.read(10_000):
            assert len(piece) <= 10_000
            pieces.append(piece)
    assert b"".join(pieces) == data


def test_artifact_store_writer_is_write_only_and_not_seekable(backend: Backend) -> None:
    with backend.store.writer("runs/r/s/1/flags") as w:
        assert w.writable() and not w.seekable() and not w.readable()
        assert w.write(memoryview(b"abc")) == 3
        assert w.write(bytearray(b"de")) == 2
        assert w.result is None
    assert w.result is not None
    assert backend.store.get_bytes(w.result.uri) == b"abcde"
    with pytest.raises(ValueError):
        w.write(b"late")


def test_artifact_store_empty_artifact_round_trips(backend: Backend) -> None:
    with backend.store.writer("runs/r/s/1/empty") as w:
        pass
    assert w.result is not None
    assert w.result.size_bytes == 0
    assert w.result.content_hash == _sha256(b"")
    assert backend.store.get_bytes(w.result.uri) == b""


def test_artifact_store_multipart_object_round_trips(backend: Backend) -> None:
    # 4 parts of 5 MiB plus a tail, written in pieces that straddle part boundaries.
    data = os.urandom(4 * PART_SIZE_BYTES + 12_345)
    stored = _write_in_chunks(backend.store, "runs/r/s/1/big", data, chunk_bytes=MiB + 3)

    assert stored.size_bytes == len(data)
    assert stored.content_hash == _sha256(data)
    digest = hashlib.sha256()
    with backend.store.reader(stored.uri) as f:
        while piece := f.read(3 * MiB):
            digest.update(piece)
    assert f"sha256:{digest.hexdigest()}" == stored.content_hash


def test_artifact_store_reader_seeks(backend: Backend) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    stored = backend.store.put_bytes("runs/r/s/1/seek", data)
    with backend.store.reader(stored.uri) as f:
        assert f.read(4) == data[:4]
        f.seek(700_000)
        assert f.tell() == 700_000
        assert f.read(10) == data[700_000:700_010]
        f.seek(-5, io.SEEK_END)
        assert f.read() == data[-5:]
        f.seek(3)
        assert f.read(3) == data[3:6]


def test_artifact_store_numpy_array_round_trips(backend: Backend) -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(3 * 1024 * 1024, dtype=np.float64).reshape(1024, -1)  # 24 MiB
    with backend.store.writer("runs/r/s/1/array.npy") as w:
        np.save(w, array)
    assert w.result is not None
    with backend.store.reader(w.result.uri) as f:
        loaded = np.load(f)
    assert np.array_equal(loaded, array)


def test_artifact_store_writer_holds_at_most_about_one_part(streaming_backend: Backend) -> None:
    backend = streaming_backend
    chunk = os.urandom(MiB)
    backend.store.check()  # loads the S3 client's service model (~10 MiB) before measuring
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with backend.store.writer("runs/r/s/1/bounded") as w:
            for _ in range(30):
                w.write(chunk)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w.result is not None and w.result.size_bytes == 30 * MiB
    # One part being filled plus the copy being sent; buffering it all would need 30 MiB.
    assert peak_bytes < 3 * PART_SIZE_BYTES, peak_bytes


# -- aborts and immutability --------------------------------------------------------


@pytest.mark.parametrize("size_bytes", [10, 2 * PART_SIZE_BYTES + 1], ids=["small", "multipart"])
def test_artifact_store_exception_in_writer_leaves_nothing(
    backend: Backend, size_bytes: int
) -> None:
    uri = backend.store.put_bytes("runs/r/s/1/probe", b"x").uri.replace("probe", "aborted")
    before = backend.listing()

    with (
        pytest.raises(RuntimeError, match="step failed"),
        backend.store.writer("runs/r/s/1/aborted") as w,
    ):
        w.write(os.urandom(size_bytes))
        raise RuntimeError("step failed")

    assert w.result is None
    assert not backend.store.exists(uri)
    with pytest.raises(ArtifactNotFoundError):
        backend.store.get_bytes(uri)
    assert backend.listing() == before


@pytest.mark.parametrize("size_bytes", [10, PART_SIZE_BYTES + 1], ids=["small", "multipart"])
def test_artifact_store_refuses_to_overwrite(backend: Backend, size_bytes: int) -> None:
    first = backend.store.put_bytes("runs/r/s/1/once", b"first")
    before = backend.listing()

    with pytest.raises(ArtifactStoreError, match="already exists") as raised:
        backend.store.put_bytes("runs/r/s/1/once", os.urandom(size_bytes))

    assert type(raised.value) is ArtifactStoreError
    assert backend.store.get_bytes(first.uri) == b"first"
    assert backend.listing() == before


# -- lookups, deletes, URIs ---------------------------------------------------------


def test_artifact_store_missing_object_raises_not_found(backend: Backend) -> None:
    uri = backend.store.put_bytes("runs/r/s/1/here", b"1").uri.replace("/here", "/missing")
    assert not backend.store.exists(uri)
    with pytest.raises(ArtifactNotFoundError):
        backend.store.get_bytes(uri)
    with pytest.raises(ArtifactNotFoundError), backend.store.reader(uri):
        pass


def test_artifact_store_delete_is_idempotent(backend: Backend) -> None:
    stored = backend.store.put_bytes("runs/r/s/1/doomed", b"bye")
    backend.store.delete(stored.uri)
    assert not backend.store.exists(stored.uri)
    backend.store.delete(stored.uri)
    with pytest.raises(ArtifactNotFoundError):
        backend.store.get_bytes(stored.uri)


def test_artifact_store_reads_uri_of_another_root_with_same_scheme(backend: Backend) -> None:
    other = backend.sibling()
    stored = other.put_bytes("shared/model", b"weights")
    assert not stored.uri.startswith(backend.store.root_uri + "/")
    assert backend.store.exists(stored.uri)
    assert backend.store.get_bytes(stored.uri) == b"weights"


@pytest.mark.parametrize(
    "uri", ["gs://bucket/key", "http://example.com/key", "ftp://host/key"], ids=str
)
def test_artifact_store_rejects_uri_of_another_scheme(backend: Backend, uri: str) -> None:
    with pytest.raises(ArtifactStoreError) as raised:
        backend.store.get_bytes(uri)
    assert not isinstance(raised.value, ArtifactNotFoundError)
    with pytest.raises(ArtifactStoreError):
        backend.store.exists(uri)


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/../b", "./a", "a/", "a\\b", "a#b", "a?b", "a\x00b", "a\nb"]
)
def test_artifact_store_rejects_bad_keys(backend: Backend, key: str) -> None:
    with pytest.raises(ArtifactStoreError, match="relative path"):
        backend.store.put_bytes(key, b"x")


def test_artifact_store_check_passes_on_a_usable_store(backend: Backend) -> None:
    backend.store.check()


# -- verified reads ------------------------------------------------------------------


def _replace_object(backend: Backend, uri: str, data: bytes) -> None:
    """Overwrite the stored bytes behind the store's back (bit rot, a bad copy, truncation)."""
    store = backend.store
    if isinstance(store, LocalArtifactStore):
        store.path_for(uri).write_bytes(data)
    elif isinstance(store, MemoryArtifactStore):
        store.objects[uri.split("/", 3)[3]] = data
    else:
        assert isinstance(store, S3ArtifactStore)
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        store.client.put_object(Bucket=bucket, Key=key, Body=data)


def _verified(backend: Backend, stored: Any) -> Any:
    return backend.store.verified_reader(
        stored.uri, expected_hash=stored.content_hash, expected_size_bytes=stored.size_bytes
    )


def test_artifact_store_verified_reader_reads_intact_multipart_object(backend: Backend) -> None:
    data = os.urandom(2 * PART_SIZE_BYTES + 12_345)
    stored = _write_in_chunks(backend.store, "runs/r/s/1/intact", data, chunk_bytes=MiB + 3)

    with _verified(backend, stored) as f:
        assert f.read(10) == data[:10]
        f.seek(PART_SIZE_BYTES)  # a ranged GET on S3
        assert f.read(5) == data[PART_SIZE_BYTES : PART_SIZE_BYTES + 5]
    assert f.verified
    with _verified(backend, stored) as f:
        pieces = []
        while piece := f.read(3 * MiB):
            pieces.append(piece)
        assert f.verified
    assert b"".join(pieces) == data


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("read", ["whole", "partial"])
def test_artifact_store_verified_reader_refuses_a_flipped_byte(
    backend: Backend, where: str, read: str
) -> None:
    data = os.urandom(PART_SIZE_BYTES + 7)
    stored = backend.store.put_bytes("runs/r/s/1/flipped", data)
    at = 0 if where == "first" else len(data) - 1
    damaged = bytearray(data)
    damaged[at] ^= 0x80
    _replace_object(backend, stored.uri, bytes(damaged))

    with pytest.raises(ArtifactIntegrityError) as info, _verified(backend, stored) as f:
        f.read() if read == "whole" else f.read(100)

    assert info.value.expected_hash == stored.content_hash
    assert info.value.actual_hash == _sha256(bytes(damaged))
    assert stored.uri in str(info.value)


@pytest.mark.parametrize("keep", [0, PART_SIZE_BYTES], ids=["empty", "one-part"])
def test_artifact_store_verified_reader_refuses_a_truncated_object(
    backend: Backend, keep: int
) -> None:
    data = os.urandom(PART_SIZE_BYTES + 7)
    stored = backend.store.put_bytes("runs/r/s/1/truncated", data)
    _replace_object(backend, stored.uri, data[:keep])

    with pytest.raises(ArtifactIntegrityError, match="truncated") as info:  # noqa: SIM117
        with _verified(backend, stored) as f:
            assert f.read() == data[:keep]

    assert (info.value.actual_size_bytes, info.value.expected_size_bytes) == (keep, len(data))


def test_artifact_store_verified_numpy_load_names_corruption_not_a_parse_error(
    backend: Backend,
) -> None:
    np = pytest.importorskip("numpy")
    from zenml_workers.sdk.materializers import NumpyMaterializer

    with backend.store.writer("runs/r/s/1/array.npy") as w:
        NumpyMaterializer().save(np.arange(1024 * 1024, dtype=np.float64), w)  # type: ignore[arg-type]
    stored = w.result
    assert stored is not None
    data = backend.store.get_bytes(stored.uri)
    _replace_object(backend, stored.uri, data[: len(data) // 3])  # numpy raises on this

    with pytest.raises(ArtifactIntegrityError) as info, _verified(backend, stored) as f:
        NumpyMaterializer().load(f, None)
    assert info.value.actual_size_bytes == len(data) // 3


# -- S3 failures against the real server --------------------------------------------


@pytest.mark.services
@pytest.mark.parametrize("which", ["wrong secret", "unknown key id"])
def test_s3_store_wrong_credentials_fail_check_and_write(s3_server: S3Server, which: str) -> None:
    bucket = s3_server.make_bucket()
    bad = (
        {"secret_access_key": s3_server.secret_access_key[::-1]}
        if which == "wrong secret"
        else {"access_key_id": "ZWUNKNOWNKEY0000000"}
    )
    store = _s3_store(s3_server, f"s3://{bucket}/p", **bad)

    with pytest.raises(ArtifactStoreCredentialsError, match="ZW_S3_SECRET_ACCESS_KEY"):
        store.check()
    with pytest.raises(ArtifactStoreCredentialsError, match="ZW_S3_ACCESS_KEY_ID"):
        store.put_bytes("runs/r/s/1/x", b"x")
    with pytest.raises(ArtifactStoreCredentialsError):
        store.put_bytes("runs/r/s/1/big", os.urandom(PART_SIZE_BYTES + 1))
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@pytest.mark.services
def test_s3_store_missing_bucket_fails_check_and_write(s3_server: S3Server) -> None:
    bucket = f"zw-missing-{uuid.uuid4().hex[:12]}"
    store = _s3_store(s3_server, f"s3://{bucket}/p")

    with pytest.raises(ArtifactStoreError, match="create it or fix ZW_ARTIFACT_URI") as raised:
        store.check()
    assert not isinstance(raised.value, ArtifactStoreCredentialsError)
    with pytest.raises(ArtifactStoreError, match="does not exist"):
        store.put_bytes("runs/r/s/1/x", b"x")
    with pytest.raises(ArtifactStoreError, match="does not exist"):
        store.get_bytes(f"s3://{bucket}/p/runs/r/s/1/x")


@pytest.mark.services
def test_s3_store_unreachable_endpoint_fails_check(s3_server: S3Server) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        store = _s3_store(
            s3_server, f"s3://{s3_server.make_bucket()}/p", endpoint_url=f"http://127.0.0.1:{port}"
        )
        with pytest.raises(ArtifactStoreError, match="ZW_S3_ENDPOINT_URL"):
            store.check()


@pytest.mark.services
@pytest.mark.parametrize("size_bytes", [10, PART_SIZE_BYTES + 1], ids=["small", "multipart"])
def test_s3_store_without_conditional_writes_still_refuses_overwrite(
    s3_server: S3Server, size_bytes: int
) -> None:
    store = _s3_store(s3_server, f"s3://{s3_server.make_bucket()}/p")
    assert isinstance(store, S3ArtifactStore)
    store.conditional_writes = False  # as after a server answered If-None-Match with NotImplemented
    first = store.put_bytes("runs/r/s/1/once", os.urandom(size_bytes))

    with pytest.raises(ArtifactStoreError, match="already exists"):
        store.put_bytes("runs/r/s/1/once", b"second")
    assert _sha256(store.get_bytes(first.uri)) == first.content_hash
