"""Pipelines that go wrong on purpose: a raising step, an unpicklable output, a flaky step.

The flaky step counts its attempts in a marker file whose path is a parameter,
so the count survives across worker processes without any shared memory.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step

#: The exact line that raises in :func:`explode`, looked for in the remote traceback.
RAISING_LINE = 'raise ValueError(f"explode got {x}, which is not allowed")'


@step
def start(n: int = 1) -> Annotated[int, "value"]:
    """Emit ``n``."""
    return n


@step
def explode(x: int) -> Annotated[int, "never"]:
    """Always raises."""
    if x >= 0:
        raise ValueError(f"explode got {x}, which is not allowed")
    return x


@step
def after_explode(x: int) -> Annotated[int, "never_either"]:
    """Downstream of :func:`explode`; must be skipped."""
    return x + 1


@pipeline
def exploding(n: int = 1) -> None:
    """start -> explode -> after_explode."""
    after_explode(explode(start(n=n)))


class LockHolder:
    """An object cloudpickle cannot serialise: it holds a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


@step
def make_holder(x: int) -> Annotated[LockHolder, "holder"]:
    """Returns a value that no materializer can save."""
    return LockHolder()


@pipeline
def unpicklable(n: int = 1) -> None:
    """start -> make_holder."""
    make_holder(start(n=n))


@step(retries=2)
def flaky(marker: str, failures: int = 2) -> Annotated[int, "attempts"]:
    """Fails its first ``failures`` attempts (counted in the ``marker`` file), then succeeds."""
    path = Path(marker)
    attempts = (int(path.read_text()) if path.exists() else 0) + 1
    path.write_text(str(attempts))
    if attempts <= failures:
        raise RuntimeError(f"flaky attempt {attempts} fails on purpose")
    return attempts


@pipeline
def flaky_pipeline(marker: str, failures: int = 2) -> None:
    """A single flaky step."""
    flaky(marker=marker, failures=failures)


@step(queue="nope")
def misrouted(x: int) -> Annotated[int, "value"]:
    """Names a queue no stack knows."""
    return x


@pipeline
def unknown_queue(n: int = 1) -> None:
    """start -> misrouted (queue 'nope')."""
    misrouted(start(n=n))
