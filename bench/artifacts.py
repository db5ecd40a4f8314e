"""Benchmark 5: a large numpy array through the S3 artifact store vs raw boto3, on SeaweedFS.

Each transfer runs in its own child process (:mod:`bench.transfer`) so that
its peak RSS is its own. Writes go first (ours, then raw), then reads of the
objects just written, all against one ``weed mini`` started here. Our read runs
unverified and verified (every byte hashed against the recorded sha256, as workers
and ``ArtifactView.load`` do) in the order plain, verified, verified, plain, so that a
server cache warming up favours neither; ``s3.read_verified`` compares their means.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.report import Result, median, progress
from bench.services import REPO_ROOT, S3Server, service_env, start_seaweedfs

__all__ = ["bench_s3"]

MIB = 1024 * 1024


def _child(
    s3: S3Server,
    bucket: str,
    variant: str,
    key: str,
    size_bytes: int,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    env = service_env(
        {
            "BENCH_S3_ENDPOINT": s3.endpoint_url,
            "BENCH_S3_KEY": s3.access_key_id,
            "BENCH_S3_SECRET": s3.secret_access_key,
            "BENCH_S3_BUCKET": bucket,
            **(extra_env or {}),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "bench.transfer", variant, key, str(size_bytes)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"S3 transfer {variant} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    progress(
        f"  {variant:10s} {size_bytes / MIB:.0f} MiB in {out['seconds']:.2f} s "
        f"({size_bytes / MIB / out['seconds']:.0f} MiB/s), extra peak RSS {out['extra_peak_bytes'] / MIB:.0f} MiB"
    )
    return out


def bench_s3(workdir: Path, size_bytes: int) -> list[Result]:
    """Write and read ``size_bytes`` of numpy data with our store and with raw boto3."""
    s3 = start_seaweedfs(workdir / "seaweedfs")
    try:
        bucket = s3.make_bucket("zw-bench")
        progress(f"SeaweedFS up at {s3.endpoint_url}; moving {size_bytes / MIB:.0f} MiB each way")
        runs = {
            variant: _child(s3, bucket, variant, variant.split("-")[0], size_bytes)
            for variant in ("ours-write", "raw-write")
        }
        expected = {
            "BENCH_EXPECTED_HASH": runs["ours-write"]["content_hash"],
            "BENCH_EXPECTED_SIZE": str(runs["ours-write"]["stored_bytes"]),
        }
        reads: dict[str, list[dict[str, Any]]] = {"ours-read": [], "ours-read-verified": []}
        for variant in ("ours-read", "ours-read-verified", "ours-read-verified", "ours-read"):
            reads[variant].append(_child(s3, bucket, variant, "ours", size_bytes, expected))
        runs["ours-read"] = reads["ours-read"][0]  # s3.read: the first read, as before
        runs["raw-read"] = _child(s3, bucket, "raw-read", "raw", size_bytes)
    finally:
        s3.stop()
    samples = [*runs.values(), *reads["ours-read"], *reads["ours-read-verified"]]
    crcs = {r["variant"]: r["crc32"] for r in samples}
    if len({r["crc32"] for r in samples}) != 1:
        raise RuntimeError(f"S3 round trip corrupted the data (crc32 per variant: {crcs})")
    results = []
    for op in ("write", "read"):
        ours, raw = runs[f"ours-{op}"], runs[f"raw-{op}"]
        copies = ours["extra_peak_bytes"] / size_bytes
        results.append(
            Result(
                name=f"s3.{op}",
                description=(
                    f"{size_bytes / MIB:.0f} MiB numpy array {'written' if op == 'write' else 'read'} through "
                    f"NumpyMaterializer + S3ArtifactStore (8 MiB parts, sequential) vs raw boto3 "
                    f"{'upload_fileobj' if op == 'write' else 'download_fileobj'} of the same bytes "
                    "(8 MiB parts, 10 threads) on SeaweedFS; each in a fresh process"
                ),
                unit="s",
                value=ours["seconds"],
                baseline=raw["seconds"],
                baseline_source="raw boto3, this run",
                ratio=ours["seconds"] / raw["seconds"],
                ratio_meaning="ours / raw",
                raw={
                    "size_bytes": size_bytes,
                    "ours": ours,
                    "raw": raw,
                    "ours_mib_per_s": size_bytes / MIB / ours["seconds"],
                    "raw_mib_per_s": size_bytes / MIB / raw["seconds"],
                    "ours_extra_peak_rss_copies": copies,
                    "raw_extra_peak_rss_copies": raw["extra_peak_bytes"] / size_bytes,
                },
            )
        )
        results.append(
            Result(
                name=f"s3.{op}_peak_rss",
                description=(
                    f"extra peak RSS of the {op} beyond the array itself (ru_maxrss after minus before, "
                    f"{'minus the result' if op == 'read' else 'source array already allocated'}); ours vs raw boto3"
                ),
                unit="MiB",
                # ru_maxrss is a high-water mark: when the imports had already pushed it
                # higher, "after minus before" comes out below the array size. Shown as 0
                # (no extra copy); the raw value stays in results.json.
                value=max(0.0, ours["extra_peak_bytes"] / MIB),
                baseline=max(0.0, raw["extra_peak_bytes"] / MIB),
                baseline_source="raw boto3, this run",
                ratio=None,
                target=f"<= {size_bytes / MIB:.0f} MiB (one copy); ours = {max(0.0, copies):.3f} copies",
                raw={
                    "ours_copies": copies,
                    "raw_copies": raw["extra_peak_bytes"] / size_bytes,
                    "ours_extra_peak_bytes": ours["extra_peak_bytes"],
                    "raw_extra_peak_bytes": raw["extra_peak_bytes"],
                },
            )
        )
    results.append(_verification_result(reads, size_bytes))
    return results


def _sha256_mib_per_s() -> float:
    """In-memory sha256 throughput of this machine, to tell hashing from I/O in the figures."""
    import hashlib
    import time

    block = bytes(range(256)) * (256 * 1024)  # 64 MiB
    started = time.perf_counter()
    hashlib.sha256(block).digest()
    return len(block) / MIB / (time.perf_counter() - started)


def _verification_result(reads: dict[str, list[dict[str, Any]]], size_bytes: int) -> Result:
    plain = [r["seconds"] for r in reads["ours-read"]]
    verified = [r["seconds"] for r in reads["ours-read-verified"]]
    plain_s, verified_s = median(plain), median(verified)
    hash_mib_per_s = _sha256_mib_per_s()
    progress(
        f"  verification: {verified_s:.2f} s verified vs {plain_s:.2f} s plain "
        f"(+{(verified_s / plain_s - 1) * 100:.0f}%); sha256 alone {hash_mib_per_s:.0f} MiB/s here"
    )
    return Result(
        name="s3.read_verified",
        description=(
            f"{size_bytes / MIB:.0f} MiB numpy array read through S3ArtifactStore.verified_reader "
            "+ NumpyMaterializer (sha256 of every byte checked against the recorded hash, as "
            "workers and ArtifactView.load do) vs the same read unverified; order plain, "
            "verified, verified, plain, mean of two each, each in a fresh process"
        ),
        unit="s",
        value=verified_s,
        baseline=plain_s,
        baseline_source="unverified read through S3ArtifactStore.reader, this run",
        ratio=verified_s / plain_s,
        ratio_meaning="verified / unverified",
        raw={
            "size_bytes": size_bytes,
            "verified_seconds": verified,
            "plain_seconds": plain,
            "verified_mib_per_s": size_bytes / MIB / verified_s,
            "plain_mib_per_s": size_bytes / MIB / plain_s,
            "sha256_in_memory_mib_per_s": hash_mib_per_s,
            "verified_extra_peak_bytes": [
                r["extra_peak_bytes"] for r in reads["ours-read-verified"]
            ],
            "plain_extra_peak_bytes": [r["extra_peak_bytes"] for r in reads["ours-read"]],
        },
    )
