"""Benchmark pipelines, in an importable module so that Celery workers can load their steps.

Every step is trivial (an int in, an int out), so a run's wall time is the
framework's overhead: planning, claiming, committing, artifact writes and the
hand-off between steps. The seed parameter makes each run distinct, so nothing
is served from the cache unless a benchmark asks for exactly that.
"""

from __future__ import annotations

from typing import Annotated

from zenml_workers.sdk.pipeline import Pipeline, pipeline
from zenml_workers.sdk.step import step

__all__ = ["CHAIN_LENGTH", "chain", "fan_in", "fan_out", "long_chain", "make_chain", "wide"]

#: Steps in :func:`chain`.
CHAIN_LENGTH = 10


@step
def start(seed: int) -> Annotated[int, "value"]:
    """Emit ``seed``."""
    return seed


@step
def inc(x: int) -> Annotated[int, "value"]:
    """Return ``x + 1``."""
    return x + 1


@step
def branch(seed: int, i: int) -> Annotated[int, "value"]:
    """One fan-out branch: ``seed + i``."""
    return seed + i


@step
def leaf(seed: int, i: int) -> Annotated[int, "value"]:
    """An independent step with no inputs but its parameters."""
    return seed + i


@step
def gather(parts: list[int]) -> Annotated[int, "total"]:
    """Fan-in: the sum of all branches."""
    return sum(parts)


def make_chain(length: int, name: str) -> Pipeline:
    """A pipeline of ``length`` steps, each passing an int to the next."""

    def body(seed: int = 0) -> None:
        value = start(seed)
        for _ in range(length - 1):
            value = inc(value)

    body.__name__ = name
    body.__qualname__ = name
    return pipeline(body)


#: ``start -> inc x 9``: the 10-step chain.
chain = make_chain(CHAIN_LENGTH, "bench_chain")
#: A 100-step chain, for the fully cached re-run.
long_chain = make_chain(100, "bench_chain_100")


@pipeline
def fan_in(seed: int = 0, width: int = 50) -> None:
    """``1 -> width -> 1``: one start, ``width`` branches, one gather."""
    s = start(seed)
    gather([branch(s, i) for i in range(width)])


@pipeline
def fan_out(seed: int = 0, width: int = 1000) -> None:
    """``width`` independent steps (no inputs), all ready at once."""
    for i in range(width):
        leaf(seed, i)


#: Alias used by the planning benchmark.
wide = fan_out
