"""Version 1 of a step that :mod:`tests.pipelines.edited_v2` edits (same name, new body)."""

from __future__ import annotations

from typing import Annotated

from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step


@step
def transform(x: int) -> Annotated[int, "y"]:
    """Double ``x``."""
    return x * 2


@pipeline(name="edited")
def edited(x: int = 3) -> None:
    """A single transform step."""
    transform(x=x)
