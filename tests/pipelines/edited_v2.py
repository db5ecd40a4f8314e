"""Version 2 of :mod:`tests.pipelines.edited_v1`: the same step with an edited body."""

from __future__ import annotations

from typing import Annotated

from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step


@step
def transform(x: int) -> Annotated[int, "y"]:
    """Triple ``x``."""
    return x * 3


@pipeline(name="edited")
def edited(x: int = 3) -> None:
    """A single transform step."""
    transform(x=x)
