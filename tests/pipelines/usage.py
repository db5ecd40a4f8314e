"""Pipelines whose steps spend some CPU, for the cost tests; workers import this module by name.

Each step burns a fixed amount of arithmetic, so every attempt has a measurable (nonzero)
wall and CPU time; the tests compare recorded numbers with each other, never with a clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from zenml_workers import pipeline, step, trainer


def _burn(n: int) -> int:
    return sum(i * i % 7 for i in range(n))


@step
def prepare(n: int = 200_000) -> Annotated[int, "data"]:
    return _burn(n)


@trainer
def fit(data: int, n: int = 200_000) -> Annotated[int, "model"]:
    return data + _burn(n)


@pipeline
def costed(n: int = 200_000) -> None:
    """prepare (cpu queue) -> fit (a trainer: gpu queue)."""
    fit(prepare(n=n), n=n)


@trainer
def fit_alone(n: int = 200_000) -> Annotated[int, "model"]:
    return _burn(n)


@pipeline
def train_only(n: int = 200_000) -> None:
    """A single trainer step, for a cluster with only a gpu worker."""
    fit_alone(n=n)


@step(retries=1, enable_cache=False)
def fails_once(marker: str, n: int = 200_000) -> Annotated[int, "value"]:
    """Burns CPU, then fails its first attempt (remembered in the ``marker`` file)."""
    value = _burn(n)
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("the first attempt fails on purpose")
    return value


@pipeline(enable_cache=False)
def retried(marker: str, n: int = 200_000) -> None:
    fails_once(marker=marker, n=n)
