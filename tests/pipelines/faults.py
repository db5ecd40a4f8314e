"""Pipelines the fault suite and the fault bench submit; workers import this module by name.

Every step body appends ``<invocation> <pid>`` to ``<marker_dir>/bodies.log`` when it starts,
so a test can count how often each body ran. ``hold`` writes ``pid-<tag>-<pid>`` and blocks
until ``release-<tag>`` exists, which gives a test a step to kill, partition or outlast.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Annotated

from zenml_workers import pipeline, step

HOLD_LIMIT_S = 120.0


def record(marker_dir: str, invocation: str) -> None:
    """Append one line for this body run (O_APPEND: lines from many processes never mix)."""
    with open(Path(marker_dir) / "bodies.log", "a") as f:
        f.write(f"{invocation} {os.getpid()}\n")


@step(enable_cache=False)
def source(marker_dir: str, seed: int) -> Annotated[int, "value"]:
    record(marker_dir, "source")
    return seed


@step(enable_cache=False)
def hold(marker_dir: str, v: int, tag: str = "h") -> Annotated[int, "held"]:
    """Blocks until ``release-<tag>`` exists in ``marker_dir`` (at most two minutes)."""
    record(marker_dir, "hold")
    d = Path(marker_dir)
    (d / f"pid-{tag}-{os.getpid()}").write_text(str(os.getpid()))
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (d / f"release-{tag}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return v + 1


@step(enable_cache=False)
def branch(marker_dir: str, v: int, k: int) -> Annotated[int, "part"]:
    record(marker_dir, f"branch_{k}")
    return v * k


@step(enable_cache=False)
def join(marker_dir: str, parts: list[int]) -> Annotated[int, "total"]:
    record(marker_dir, "join")
    return sum(parts)


@pipeline(enable_cache=False)
def diamond(marker_dir: str = "", seed: int = 1, tag: str = "h", width: int = 3):
    """source -> hold -> ``width`` branches -> join; the total is ``(seed + 1) * sum(1..width)``."""
    held = hold(marker_dir, source(marker_dir, seed), tag=tag)
    join(marker_dir, [branch(marker_dir, held, k) for k in range(1, width + 1)])


def diamond_total(seed: int, width: int = 3) -> int:
    return (seed + 1) * sum(range(1, width + 1))


@step(enable_cache=False, queue="edge")
def on_edge(marker_dir: str, seed: int) -> Annotated[int, "value"]:
    record(marker_dir, "on_edge")
    return seed * 2


@pipeline(enable_cache=False)
def edge_only(marker_dir: str = "", seed: int = 1):
    """One step on the ``edge`` queue, which only the worker "on another VM" consumes."""
    on_edge(marker_dir, seed)


@step(enable_cache=False)
def nap(marker_dir: str, v: int, k: int) -> Annotated[int, "part"]:
    """Sleeps a random 0.2-2 s (so a run stays in flight a few seconds), returns ``v * k``."""
    record(marker_dir, f"nap_{k}")
    time.sleep(random.uniform(0.2, 2.0))
    return v * k


@pipeline(enable_cache=False)
def fan(marker_dir: str = "", seed: int = 1, width: int = 6):
    """source -> ``width`` naps side by side -> join; the total is ``seed * sum(1..width)``."""
    v = source(marker_dir, seed)
    join(marker_dir, [nap(marker_dir, v, k) for k in range(1, width + 1)])


def fan_total(seed: int, width: int = 6) -> int:
    return seed * sum(range(1, width + 1))
