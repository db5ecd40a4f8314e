"""Unit tests for the local and memory artifact stores and the store factory (no network)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from stores.artifacts import (
    ArtifactStoreError,
    LocalArtifactStore,
    MemoryArtifactStore,
    S3ArtifactStore,
    artifact_store_from_uri,
)
from stores.artifacts.local import _LocalWriter


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_local_store_uri_is_file_uri_of_absolute_path(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "art")
    stored = store.put_bytes("runs/r/s/1/out", b"data")

    assert store.root_uri == (tmp_path / "art").as_uri()
    assert stored.uri == (tmp_path / "art" / "runs/r/s/1/out").as_uri()
    assert (tmp_path / "art/runs/r/s/1/out").read_bytes() == b"data"
    assert store.path_for(stored.uri) == tmp_path / "art/runs/r/s/1/out"


def test_local_store_relative_root_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = artifact_store_from_uri("relative/art")
    assert isinstance(store, LocalArtifactStore)
    assert store.root == tmp_path / "relative/art"
    monkeypatch.chdir("/")
    stored = store.put_bytes("k", b"1")
    assert (tmp_path / "relative/art/k").read_bytes() == b"1"
    assert store.get_bytes(stored.uri) == b"1"


def test_local_store_accepts_file_uri_root_and_plain_paths_for_reads(tmp_path: Path) -> None:
    store = artifact_store_from_uri((tmp_path / "a b").as_uri())
    assert isinstance(store, LocalArtifactStore)
    assert store.root == tmp_path / "a b"
    stored = store.put_bytes("x y/z", b"spaced")
    assert "%20" in stored.uri
    assert store.get_bytes(stored.uri) == b"spaced"
    assert store.exists(str(tmp_path / "a b/x y/z"))


def test_local_store_commit_leaves_only_the_artifact(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with store.writer("runs/r/s/1/out") as w:
        w.write(b"abc")
        temp_files = _files(tmp_path)
        assert len(temp_files) == 1 and temp_files[0].endswith(".tmp")
        assert not (tmp_path / "runs/r/s/1/out").exists()  # invisible until commit
    assert _files(tmp_path) == ["runs/r/s/1/out"]


def test_local_store_abort_removes_temp_file(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(KeyError), store.writer("runs/r/s/1/out") as w:
        w.write(b"partial")
        raise KeyError("boom")
    assert _files(tmp_path) == []


def test_local_store_fsync_option_still_commits(tmp_path: Path) -> None:
    stored = LocalArtifactStore(tmp_path, fsync=True).put_bytes("k", b"durable")
    assert Path(stored.uri.removeprefix("file://")).read_bytes() == b"durable"


def test_local_store_concurrent_writers_of_one_key_have_one_winner(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    writers = 8
    barrier = threading.Barrier(writers)
    outcomes: list[str] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        with store.writer("runs/r/s/1/out") as w:
            w.write(f"writer {i}".encode())
            barrier.wait(timeout=10)  # every writer has its temp file before anyone commits
        with lock:
            outcomes.append(f"writer {i}")

    def run(i: int) -> None:
        try:
            write(i)
        except ArtifactStoreError:
            with lock:
                outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    winners = [o for o in outcomes if o != "refused"]
    assert len(outcomes) == writers
    assert len(winners) == 1
    assert (tmp_path / "runs/r/s/1/out").read_text() == winners[0]
    assert _files(tmp_path) == ["runs/r/s/1/out"]


def test_local_store_falls_back_to_replace_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    store = LocalArtifactStore(tmp_path)
    stored = store.put_bytes("k", b"first")
    with pytest.raises(ArtifactStoreError, match="already exists"):
        store.put_bytes("k", b"second")
    assert store.get_bytes(stored.uri) == b"first"
    assert _files(tmp_path) == ["k"]


def test_local_store_check_creates_root(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "new/root")
    store.check()
    assert (tmp_path / "new/root").is_dir()
    assert _files(tmp_path) == []


def test_local_store_check_names_the_fix_when_root_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a folder")
    store = LocalArtifactStore(tmp_path / "file/art")
    with pytest.raises(ArtifactStoreError, match="ZW_ARTIFACT_URI"):
        store.check()
    with pytest.raises(ArtifactStoreError, match="ZW_ARTIFACT_URI"):
        store.put_bytes("k", b"x")


def test_local_store_rejects_remote_file_uri(tmp_path: Path) -> None:
    with pytest.raises(ArtifactStoreError, match="host"):
        LocalArtifactStore(tmp_path).get_bytes("file://otherhost/etc/passwd")


def test_writer_tell_counts_bytes_and_close_blocks_writes(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with store.writer("k") as w:
        assert isinstance(w, _LocalWriter)
        w.write(b"12345")
        w.writelines([b"67", b"8"])
        assert w.tell() == 8
        w.close()
        with pytest.raises(ValueError):
            w.write(b"9")
    assert w.result is not None and w.result.size_bytes == 8
    assert store.get_bytes(w.result.uri) == b"12345678"


def test_memory_stores_with_one_name_share_objects() -> None:
    name = f"unit-{uuid.uuid4().hex}"
    first = artifact_store_from_uri(f"memory://{name}")
    second = artifact_store_from_uri(f"memory://{name}/sub")
    assert isinstance(first, MemoryArtifactStore) and isinstance(second, MemoryArtifactStore)
    stored = second.put_bytes("k", b"shared")
    assert stored.uri == f"memory://{name}/sub/k"
    assert first.get_bytes(stored.uri) == b"shared"
    first.clear()
    assert not second.exists(stored.uri)


def test_factory_builds_s3_store_without_connecting_or_importing_boto3() -> None:
    code = (
        "import sys\n"
        "from stores.artifacts import artifact_store_from_uri\n"
        "s = artifact_store_from_uri('s3://bucket/some/prefix', endpoint_url='http://127.0.0.1:9')\n"
        "assert type(s).__name__ == 'S3ArtifactStore', s\n"
        "assert (s.bucket, s.prefix, s.root_uri) == ('bucket', 'some/prefix', 's3://bucket/some/prefix')\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_factory_rejects_unknown_scheme() -> None:
    with pytest.raises(ArtifactStoreError, match="unsupported scheme 'gs'"):
        artifact_store_from_uri("gs://bucket/prefix")


def test_s3_store_validates_configuration_without_network() -> None:
    with pytest.raises(ArtifactStoreError, match="5 MiB"):
        S3ArtifactStore("bucket", part_size_bytes=1024)
    with pytest.raises(ArtifactStoreError, match="s3://<bucket>"):
        artifact_store_from_uri("s3:///prefix-only")
    with pytest.raises(ArtifactStoreError, match="ZW_S3_SECRET_ACCESS_KEY"):
        S3ArtifactStore("bucket", access_key_id="only-the-id")


def test_s3_store_pickles_without_its_client() -> None:
    store = S3ArtifactStore("bucket", "p", endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    clone = pickle.loads(pickle.dumps(store))
    assert (clone.bucket, clone.prefix, clone.region) == ("bucket", "p", "eu-west-1")
    assert clone.root_uri == "s3://bucket/p"
