"""Pipelines for the cache tests: parameters that change, steps that opt out, equal outputs."""

from __future__ import annotations

from typing import Annotated, Any

from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step


@step
def base(n: int = 3) -> Annotated[int, "value"]:
    """Emit ``n``."""
    return n


@step
def scale(x: int, factor: float = 2.0) -> Annotated[float, "scaled"]:
    """Return ``x * factor``."""
    return x * factor


@step
def shift(x: float, offset: int = 1) -> Annotated[float, "shifted"]:
    """Return ``x + offset``."""
    return x + offset


@step
def unrelated(n: int = 5) -> Annotated[int, "other"]:
    """A branch that does not depend on ``factor``."""
    return n * 10


@pipeline
def scaled(n: int = 3, factor: float = 2.0) -> None:
    """base -> scale(factor) -> shift, plus an independent ``unrelated`` step."""
    shift(scale(base(n=n), factor=factor))
    unrelated()


@step(enable_cache=False)
def always_runs(n: int = 3) -> Annotated[int, "value"]:
    """Never cached, but returns the same bytes for the same ``n``."""
    return n


@pipeline
def uncached_upstream(n: int = 3) -> None:
    """always_runs (enable_cache=False) -> scale -> shift."""
    shift(scale(always_runs(n=n)))


@step
def configured(config: dict[str, Any], lr: float = 0.1) -> Annotated[str, "summary"]:
    """Echo the configuration, keys sorted."""
    return f"{sorted(config.items())} lr={lr}"


@pipeline
def with_config(config: dict[str, Any], lr: float = 0.1) -> None:
    """A single step taking a dict and a float parameter."""
    configured(config=config, lr=lr)
