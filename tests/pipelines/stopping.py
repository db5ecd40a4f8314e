"""Pipelines the stop tests (cancel, ``timeout_s``, warm shutdown) and ``bench/stop.py`` submit.

Workers import this module by name. ``hold`` writes a ``pid-<tag>-<n>-<pid>`` marker when it
starts and blocks until ``release-<tag>`` exists (at most :data:`HOLD_LIMIT_S`); an
exception raised inside it (a soft stop) is noted in an ``interrupted-<tag>-<n>-<pid>``
marker (its type inside) before it propagates, and a body that ends normally writes
``finished-<tag>-<n>-<pid>`` (``n``: nanoseconds, so that each event has its own file). ``stubborn``
swallows every exception, so only a kill ends it early.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from zenml_workers import pipeline, step

HOLD_LIMIT_S = 120.0


def _mark(d: Path, kind: str, tag: str, text: str) -> None:
    # Unique per event (two attempts may run in one warm process); the pid comes last.
    (d / f"{kind}-{tag}-{time.time_ns()}-{os.getpid()}").write_text(text)


def _hold(marker_dir: str, tag: str, *, swallow: bool) -> int:
    d = Path(marker_dir)
    _mark(d, "pid", tag, str(os.getpid()))
    deadline = time.monotonic() + HOLD_LIMIT_S
    while True:
        try:
            while not (d / f"release-{tag}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            break
        except BaseException as e:
            _mark(d, "interrupted", tag, type(e).__name__)
            if not swallow:
                raise
    _mark(d, "finished", tag, "done")
    return os.getpid()


@step(enable_cache=False)
def hold(marker_dir: str, tag: str = "h") -> Annotated[int, "pid"]:
    return _hold(marker_dir, tag, swallow=False)


@step(enable_cache=False)
def stubborn(marker_dir: str, tag: str = "s") -> Annotated[int, "pid"]:
    return _hold(marker_dir, tag, swallow=True)


@step(enable_cache=False)
def pid_of(v: int = 0) -> Annotated[int, "pid"]:
    """The pid of the process that ran it (a warm step host runs every step in one)."""
    return os.getpid()


@step(enable_cache=False, timeout_s=1, retries=1)
def overrun(marker_dir: str, tag: str = "t") -> Annotated[int, "pid"]:
    return _hold(marker_dir, tag, swallow=False)


@step(enable_cache=False, timeout_s=1)
def stubborn_overrun(marker_dir: str, tag: str = "st") -> Annotated[int, "pid"]:
    return _hold(marker_dir, tag, swallow=True)


@pipeline(enable_cache=False)
def holding(marker_dir: str = "", tag: str = "h", queue: str = "cpu", then: str = ""):
    """``hold`` on ``queue``, then ``pid_of`` on ``then`` (default: the same queue)."""
    held = hold.with_options(queue=queue)(marker_dir, tag=tag)
    pid_of.with_options(queue=then or queue)(held)


@pipeline(enable_cache=False)
def stubborn_holding(marker_dir: str = "", tag: str = "s", queue: str = "cpu"):
    pid_of.with_options(queue=queue)(stubborn.with_options(queue=queue)(marker_dir, tag=tag))


@pipeline(enable_cache=False)
def quick(v: int = 0, queue: str = "cpu"):
    pid_of.with_options(queue=queue)(v)


@pipeline(enable_cache=False)
def chain(v: int = 0, queue: str = "cpu", length: int = 10):
    out = pid_of.with_options(queue=queue)(v)
    for _ in range(length - 1):
        out = pid_of.with_options(queue=queue)(out)


@pipeline(enable_cache=False)
def timing_out(marker_dir: str = "", tag: str = "t", queue: str = "cpu"):
    overrun.with_options(queue=queue)(marker_dir, tag=tag)


@pipeline(enable_cache=False)
def stubbornly_timing_out(marker_dir: str = "", tag: str = "st", queue: str = "cpu"):
    stubborn_overrun.with_options(queue=queue)(marker_dir, tag=tag)


@pipeline(enable_cache=False)
def pair(marker_dir: str = ""):
    """Two holds side by side (tags ``p1`` and ``p2``): both start only with two processes."""
    hold(marker_dir, tag="p1", id="hold_1")
    hold(marker_dir, tag="p2", id="hold_2")


@step(enable_cache=False)
def explode(v: int) -> Annotated[int, "value"]:
    raise ValueError(f"bad value {v}")


@pipeline(enable_cache=False)
def failing(v: int = 3, queue: str = "cpu"):
    explode.with_options(queue=queue)(v)


@step
def square(v: int) -> Annotated[int, "value"]:
    return v * v


@pipeline
def cacheable(v: int = 0, queue: str = "cpu"):
    """Cached on its second run with the same ``v``: no task of that run is ever sent."""
    square.with_options(queue=queue)(square.with_options(queue=queue)(v))
