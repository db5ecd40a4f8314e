"""Pipelines of the cache-management tests (``tests/team/test_cache_admin.py``); workers
import this module by name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from zenml_workers import pipeline, step


@step
def load(n: int) -> Annotated[list[int], "data"]:
    return [n, n + 1, n + 2]


@step
def prep(data: list[int]) -> Annotated[list[int], "prepped"]:
    return [x * 2 for x in data]


@step
def train(prepped: list[int]) -> Annotated[int, "model"]:
    return sum(prepped)


@pipeline
def team_cache(n: int = 3) -> None:
    """load -> prep -> train, all cacheable."""
    train(prep(load(n)))


@step(cache_expires_after=0.5)
def stamp(n: int) -> Annotated[int, "stamp"]:
    """A cache hit for half a second after it commits."""
    return n + 1


@pipeline
def expiring(n: int = 1) -> None:
    stamp(n)


@step
def extra(n: int) -> Annotated[str, "report"]:
    return f"report {n}"


@pipeline
def producing(n: int = 3) -> None:
    """What an old run left: ``prep``'s output (reused later) and ``extra``'s (never reused)."""
    prep(load(n))
    extra(n)


@step(enable_cache=False)
def hold(marker_dir: str, prepped: list[int]) -> Annotated[int, "held"]:
    """Writes ``started``, then blocks until ``release`` exists in ``marker_dir`` (at most 120 s)."""
    d = Path(marker_dir)
    (d / "started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not (d / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(prepped)


@step(enable_cache=False)
def use(prepped: list[int], held: int) -> Annotated[int, "total"]:
    """Reads ``prepped`` once ``hold`` is released: still pending while gc runs."""
    return sum(prepped) + held


@pipeline
def consuming(n: int = 3, marker_dir: str = "") -> None:
    """load and prep as cache hits of an old run, then a held step and one that waits on it."""
    p = prep(load(n))
    use(p, hold(marker_dir, p))
