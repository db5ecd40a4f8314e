"""Benchmark 5: a large numpy array through the S3 artifact store vs raw boto3, on SeaweedFS.

Each transfer runs in its own child process (:mod:`bench.transfer`) so that
its peak RSS is its own. Writes go first (ours, then raw), then reads of the
objects just written, all against one ``weed mini`` started here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.report import Result, progress
from bench.services import REPO_ROOT, S3Server, service_env, start_seaweedfs

__all__ = ["bench_s3"]

MIB = 1024 * 1024


def _child(s3: S3Server, bucket: str, variant: str, key: str, size_bytes: int) -> dict[str, Any]:
    env = service_env(
        {
            "BENCH_S3_ENDPOINT": s3.endpoint_url,
            "BENCH_S3_KEY": s3.access_key_id,
            "BENCH_S3_SECRET": s3.secret_access_key,
            "BENCH_S3_BUCKET": bucket,
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
            variant: _child(
                s3, bucket, variant, "ours" if variant.startswith("ours") else "raw", size_bytes
            )
            for variant in ("ours-write", "raw-write", "ours-read", "raw-read")
        }
    finally:
        s3.stop()
    crcs = {v: r["crc32"] for v, r in runs.items()}
    if len(set(crcs.values())) != 1:
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
    return results
