"""Pipelines the single-flight tests submit from several teammates' processes at once.

Every step body appends one line to ``<marker_dir>/<step>.log``, so a test counts how often
each step really computed. ``salt`` makes each test's keys new. Workers import this module by
name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from zenml_workers import pipeline, step


def _mark(marker_dir: str, name: str) -> None:
    with open(Path(marker_dir) / f"{name}.log", "a") as f:
        f.write(f"{os.getpid()}\n")


def _wait_for(path: Path, timeout_s: float = 60.0) -> None:
    """Block until ``path`` exists (the test's go-ahead); a step's stand-in for real work."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


@step
def load(marker_dir: str, salt: str, hold_s: float = 0.0) -> Annotated[list[int], "rows"]:
    _mark(marker_dir, "load")
    time.sleep(hold_s)  # long enough that an identical run planned meanwhile finds it running
    return [1, 2, 3, len(salt)]


@step
def prep(rows: list[int], marker_dir: str) -> Annotated[list[int], "clean"]:
    _mark(marker_dir, "prep")
    return [r * 2 for r in rows]


@step
def train(clean: list[int], marker_dir: str) -> Annotated[int, "model"]:
    _mark(marker_dir, "train")
    return sum(clean)


@pipeline
def shared(marker_dir: str, salt: str, hold_s: float = 0.0):
    train(prep(load(marker_dir, salt, hold_s), marker_dir), marker_dir)


@step
def gated(marker_dir: str, salt: str) -> Annotated[list[int], "rows"]:
    """Says it started, waits for the test's ``release`` file, then fails on its very first
    run (when ``fail-once`` is in ``marker_dir``) and succeeds after that."""
    root = Path(marker_dir)
    _mark(marker_dir, "gated")
    (root / f"started-{len(list(root.glob('started-*')))}").touch()
    _wait_for(root / "release")
    once = root / "fail-once"
    if once.exists():
        once.unlink()
        raise RuntimeError("the first attempt fails")
    return [len(salt)]


@pipeline
def gate(marker_dir: str, salt: str):
    train(prep(gated(marker_dir, salt), marker_dir), marker_dir)
