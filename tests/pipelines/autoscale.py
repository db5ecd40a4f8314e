"""Pipelines for the autoscaling and store-identity tests; workers import this module by name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from zenml_workers import pipeline, step


@step(enable_cache=False)
def held(marker_dir: str, i: int) -> Annotated[int, "index"]:
    """Writes ``started-<i>``, then blocks until ``release`` exists in ``marker_dir`` (at most
    120 s), so a test can count running steps while they run."""
    d = Path(marker_dir)
    (d / f"started-{i}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not (d / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return i


@pipeline(enable_cache=False)
def held_fan(marker_dir: str = "", width: int = 6):
    """``width`` independent ``held`` steps: all ready at once."""
    for i in range(width):
        held(marker_dir, i)


@step(enable_cache=False)
def one(x: int = 1) -> Annotated[int, "value"]:
    return x


@pipeline(enable_cache=False)
def single(x: int = 1):
    one(x=x)
