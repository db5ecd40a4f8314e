"""A producer and a consumer for the artifact-integrity tests: corrupt the producer's file,
then see the consumer refuse it without running its body."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step


@step
def produce(n: int = 20) -> Annotated[list[int], "values"]:
    """``[0, 1, ..., n-1]``, saved as JSON (a flipped digit still parses: only the hash tells)."""
    return list(range(n))


@step(enable_cache=False)
def consume(values: list[int], marker: str = "") -> Annotated[int, "total"]:
    """Sum ``values``; first write ``marker`` (when given) to prove the body ran."""
    print("consume body ran")
    if marker:
        Path(marker).write_text("ran")
    return sum(values)


@pipeline
def produce_and_consume(n: int = 20, marker: str = "") -> None:
    """produce -> consume (never cached, so it always loads its input)."""
    consume(produce(n=n), marker=marker)
