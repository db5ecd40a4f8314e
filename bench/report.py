"""Benchmark results: one :class:`Result` per measurement, machine info, JSON and a table."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Result", "machine_info", "median", "print_table", "progress", "timed", "write_json"]

_STARTED = time.monotonic()


def progress(message: str) -> None:
    """Print a progress line with the seconds elapsed since the bench started."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes on the monotonic performance clock."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@dataclass
class Result:
    """One benchmark's outcome.

    Attributes:
        name: short identifier (``embedded.chain10``).
        description: what was measured and how.
        unit: unit of ``value`` and ``baseline`` (``s``, ``ms``, ``tasks/s``, ``MiB``...).
        value: our number.
        baseline: the number we compare with (None when there is none).
        baseline_source: where ``baseline`` comes from (same run, or a published figure).
        ratio: the comparison, as explained by ``ratio_meaning``.
        ratio_meaning: e.g. ``baseline / ours (speed-up)`` or ``ours / baseline``.
        target: the goal for ``ratio`` in words, if any.
        raw: every raw sample and intermediate number.
    """

    name: str
    description: str
    unit: str
    value: float
    baseline: float | None = None
    baseline_source: str = ""
    ratio: float | None = None
    ratio_meaning: str = ""
    target: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def machine_info() -> dict[str, Any]:
    """CPU count, memory, OS, Python, library versions and the git commit."""
    from importlib import metadata

    versions = {}
    for dist in ("celery", "kombu", "redis", "SQLAlchemy", "psycopg", "boto3", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    mem_total = None
    with contextlib.suppress(ValueError, OSError):
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem_total,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "versions": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(
    path: Path, results: Sequence[Result], info: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Write ``{"machine": ..., "run": ..., "results": {name: result}}`` to ``path``."""
    payload = {
        "machine": info,
        "run": extra,
        "results": {r.name: asdict(r) for r in results},
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s" and abs(value) < 1.0:
        return f"{value * 1000:.2f} ms"
    magnitude = abs(value)
    text = f"{value:.3g}" if magnitude < 100 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def print_table(results: Sequence[Result], info: dict[str, Any], total_s: float) -> None:
    """Print the results as a rich table (plain text when rich is missing)."""
    rows = [
        (
            r.name,
            _fmt(r.value, r.unit),
            _fmt(r.baseline, r.unit) + (f" ({r.baseline_source})" if r.baseline_source else ""),
            (f"{r.ratio:.2f}x" if r.ratio is not None else "-")
            + (f"  {r.ratio_meaning}" if r.ratio_meaning else ""),
            r.target or "",
        )
        for r in results
    ]
    title = (
        f"zenml-workers bench: {info['cpu_count']} CPUs, Python {info['python']}, "
        f"commit {str(info['git_commit'])[:10]}{' (dirty)' if info['git_dirty'] else ''}, {total_s:.0f} s"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for row in rows:
            print(" | ".join(row))
        return
    table = Table(title=title, show_lines=False)
    for header, style in (
        ("benchmark", "bold"),
        ("ours", "cyan"),
        ("baseline", ""),
        ("ratio", "green"),
        ("target", "dim"),
    ):
        table.add_column(header, style=style or None, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(160, Console().width)).print(table)
