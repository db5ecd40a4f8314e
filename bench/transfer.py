"""One measured S3 transfer in a fresh process: ``python -m bench.transfer VARIANT KEY SIZE``.

Each variant runs alone in its own interpreter, so that its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that transfer only. The
baseline RSS is taken after the imports, the S3 client and (for writes) the
source array exist; the extra peak is what the transfer itself added.

Variants:
    ours-write: NumpyMaterializer.save into S3ArtifactStore.writer (8 MiB parts, sequential).
    raw-write:  boto3 upload_fileobj of the same bytes (8 MiB parts, boto3's 10 threads).
    ours-read:  S3ArtifactStore.reader + NumpyMaterializer.load into a new array.
    ours-read-verified: the same through S3ArtifactStore.verified_reader, which hashes every
                byte against ``BENCH_EXPECTED_HASH`` (and ``BENCH_EXPECTED_SIZE``), as workers do.
    raw-read:   boto3 download_fileobj into a preallocated buffer (8 MiB parts, 10 threads).

The server comes from ``BENCH_S3_ENDPOINT``, ``BENCH_S3_KEY``, ``BENCH_S3_SECRET`` and
``BENCH_S3_BUCKET`` (credentials stay out of the command line). Prints one JSON line.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import time
import zlib
from typing import Any

__all__ = ["PART_SIZE_BYTES", "VARIANTS", "make_array", "main"]

PART_SIZE_BYTES = 8 * 1024 * 1024
VARIANTS = ("ours-write", "raw-write", "ours-read", "ours-read-verified", "raw-read")
_BLOCK_BYTES = 16 * 1024 * 1024


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_array(size_bytes: int) -> Any:
    """A ``uint8`` array of ``size_bytes`` incompressible bytes, filled in place (no second copy).

    One 16 MiB random block is repeated with each block's index stamped in its first
    bytes, which is fast and gives the server nothing to compress or deduplicate.
    """
    import numpy as np

    arr = np.empty(size_bytes, dtype=np.uint8)
    block = np.random.default_rng(20240501).integers(0, 256, size=_BLOCK_BYTES, dtype=np.uint8)
    for index, offset in enumerate(range(0, size_bytes, _BLOCK_BYTES)):
        end = min(offset + _BLOCK_BYTES, size_bytes)
        arr[offset:end] = block[: end - offset]
        stamp = np.frombuffer(index.to_bytes(8, "little"), dtype=np.uint8)
        arr[offset : offset + min(8, end - offset)] = stamp[: min(8, end - offset)]
    return arr


class _ArrayReader(io.RawIOBase):
    """Reads an array's bytes without copying the whole array (boto3 reads one part at a time)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._view.nbytes}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        take = max(0, min(out.nbytes, self._view.nbytes - self._pos))
        out[:take] = self._view[self._pos : self._pos + take]
        self._pos += take
        return take


class _BufferSink:
    """A seekable write target over a preallocated buffer, for boto3's parallel ranged GETs."""

    def __init__(self, size_bytes: int) -> None:
        self.buffer = bytearray(size_bytes)
        self._view = memoryview(self.buffer)
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = offset if whence == io.SEEK_SET else self._pos + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: bytes) -> int:
        self._view[self._pos : self._pos + len(data)] = data
        self._pos += len(data)
        return len(data)


def _transfer_config(size_bytes: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_SIZE_BYTES, multipart_chunksize=PART_SIZE_BYTES)


def run(variant: str, key: str, size_bytes: int) -> dict[str, Any]:
    """Run ``variant`` on object ``key`` and return its timings and memory figures."""
    import numpy as np

    from stores.artifacts.s3 import S3ArtifactStore
    from zenml_workers.sdk.materializers.numpy import NumpyMaterializer

    bucket = os.environ["BENCH_S3_BUCKET"]
    store = S3ArtifactStore(
        bucket,
        "bench",
        endpoint_url=os.environ["BENCH_S3_ENDPOINT"],
        access_key_id=os.environ["BENCH_S3_KEY"],
        secret_access_key=os.environ["BENCH_S3_SECRET"],
        part_size_bytes=PART_SIZE_BYTES,
    )
    client = store.client
    client.list_objects_v2(Bucket=bucket, MaxKeys=1)  # connection and signer warmed up
    object_key = store.key_for(key)
    out: dict[str, Any] = {"variant": variant, "key": object_key, "size_bytes": size_bytes}
    if variant.endswith("write"):
        arr = make_array(size_bytes)
        baseline = _peak_rss_bytes()
        started = time.perf_counter()
        if variant == "ours-write":
            with store.writer(key) as writer:
                NumpyMaterializer().save(arr, writer)
            assert writer.result is not None
            out["stored_bytes"] = writer.result.size_bytes
            out["content_hash"] = writer.result.content_hash
        else:
            client.upload_fileobj(
                io.BufferedReader(
                    _ArrayReader(memoryview(arr).cast("B")), buffer_size=PART_SIZE_BYTES
                ),
                bucket,
                object_key,
                Config=_transfer_config(size_bytes),
            )
        out["seconds"] = time.perf_counter() - started
        out["result_bytes"] = 0
        out["crc32"] = zlib.crc32(arr)
    else:
        baseline = _peak_rss_bytes()
        started = time.perf_counter()
        if variant == "ours-read":
            with store.reader(f"s3://{bucket}/{object_key}") as fp:
                loaded = NumpyMaterializer().load(fp, np.ndarray)
            out["seconds"] = time.perf_counter() - started
            out["result_bytes"] = int(loaded.nbytes)
            out["crc32"] = zlib.crc32(loaded)
        elif variant == "ours-read-verified":
            with store.verified_reader(
                f"s3://{bucket}/{object_key}",
                expected_hash=os.environ["BENCH_EXPECTED_HASH"],
                expected_size_bytes=int(os.environ["BENCH_EXPECTED_SIZE"]),
            ) as fp:
                loaded = NumpyMaterializer().load(fp, np.ndarray)
            out["seconds"] = time.perf_counter() - started
            out["result_bytes"] = int(loaded.nbytes)
            out["crc32"] = zlib.crc32(loaded)
        else:
            length = int(client.head_object(Bucket=bucket, Key=object_key)["ContentLength"])
            sink = _BufferSink(length)
            client.download_fileobj(bucket, object_key, sink, Config=_transfer_config(length))
            out["seconds"] = time.perf_counter() - started
            out["result_bytes"] = length
            out["crc32"] = zlib.crc32(sink.buffer)
    peak = _peak_rss_bytes()
    out["baseline_rss_bytes"] = baseline
    out["peak_rss_bytes"] = peak
    # What the transfer needed beyond its input (writes) or its result (reads).
    # Can come out a few MiB below zero when the transfer reuses memory freed after the imports.
    out["extra_peak_bytes"] = peak - baseline - out["result_bytes"]
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in VARIANTS:
        print(
            f"usage: python -m bench.transfer {{{','.join(VARIANTS)}}} KEY SIZE_BYTES",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(run(argv[0], argv[1], int(argv[2]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
