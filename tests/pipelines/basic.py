"""Small pipelines over plain ints and lists: a chain, a diamond, a fan-out/fan-in, a split.

Every step is cheap and JSON-materialized, so these run anywhere (unit tests
build them; integration and e2e tests run them on real workers).
"""

from __future__ import annotations

from typing import Annotated

from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step

#: Width of :func:`fan_out_fan_in` unless told otherwise.
FAN_WIDTH = 50


@step
def source(n: int = 3) -> Annotated[int, "value"]:
    """Emit ``n``."""
    return n


@step
def add(x: int, y: int = 1) -> Annotated[int, "sum"]:
    """Return ``x + y``."""
    return x + y


@step
def multiply(x: int, factor: int = 2) -> Annotated[int, "product"]:
    """Return ``x * factor``."""
    return x * factor


@step
def combine(a: int, b: int) -> Annotated[int, "total"]:
    """Return ``a + b``."""
    return a + b


@step
def work(seed: int, i: int) -> Annotated[int, "result"]:
    """One fan-out branch: ``seed * 1000 + i``."""
    return seed * 1000 + i


@step
def join(parts: list[int]) -> Annotated[int, "total"]:
    """Fan-in: the sum of all branches."""
    return sum(parts)


@step
def make_list(n: int = 10) -> Annotated[list[int], "values"]:
    """Return ``[0, 1, ..., n-1]``."""
    return list(range(n))


@step
def split(
    values: list[int], ratio: float = 0.8
) -> tuple[Annotated[list[int], "train"], Annotated[list[int], "test"]]:
    """Split ``values`` at ``ratio`` of their length."""
    cut = int(len(values) * ratio)
    return values[:cut], values[cut:]


@step
def size(values: list[int]) -> Annotated[int, "count"]:
    """Return ``len(values)``."""
    return len(values)


@pipeline
def chain(n: int = 3) -> None:
    """source -> add -> multiply."""
    multiply(add(source(n=n)))


@pipeline
def diamond(n: int = 3) -> None:
    """source feeds add and multiply, which combine joins."""
    s = source(n=n)
    combine(add(s), multiply(s))


@pipeline
def fan_out_fan_in(seed: int = 7, width: int = FAN_WIDTH) -> None:
    """One source, ``width`` parallel work steps, one join over all of them."""
    s = source(n=seed)
    join([work(s, i) for i in range(width)])


@pipeline
def multi_output(n: int = 10) -> None:
    """make_list -> split -> size(train), size(test)."""
    train, test = split(make_list(n=n))
    size(train)
    size(test)
