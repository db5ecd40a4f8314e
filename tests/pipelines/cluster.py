"""Pipelines the cluster tests submit; workers import this module by name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

from zenml_workers import pipeline, step, trainer


@step
def make(x: int = 1) -> Annotated[int, "value"]:
    print(f"making {x}")
    return x


@step
def add_one(v: int) -> int:
    return v + 1


@trainer
def fit(v: int) -> Annotated[int, "model"]:
    return v * 10


@pipeline
def routed(x: int = 1):
    v = add_one(make(x=x))
    fit(v)


@step(enable_cache=False)
def slow_part(seed: int, i: int) -> Annotated[dict, "interval"]:
    """Records when it ran; a fixed duration lets the test see overlap between workers."""
    started = time.time()
    time.sleep(0.5)
    return {"i": i, "pid": os.getpid(), "start": started, "end": time.time()}


@step(enable_cache=False)
def gather(parts: list[dict]) -> Annotated[int, "count"]:
    return len(parts)


@pipeline(enable_cache=False)
def fan(seed: int = 0, width: int = 4):
    gather([slow_part(seed, i) for i in range(width)])


@step(enable_cache=False)
def explode(x: int) -> int:
    raise ValueError(f"bad value {x}")


@pipeline(enable_cache=False)
def failing(x: int = 3):
    add_one(explode(make(x=x)))


@step(enable_cache=False)
def hold(marker_dir: str) -> Annotated[int, "pid"]:
    """Writes its pid, then blocks until ``release`` exists in ``marker_dir`` (at most 120 s)."""
    d = Path(marker_dir)
    (d / f"pid-{os.getpid()}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not (d / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (d / f"finished-{os.getpid()}").write_text("done")
    return os.getpid()


@pipeline(enable_cache=False)
def holding(marker_dir: str = ""):
    add_one(hold(marker_dir))


@step(queue="nowhere")
def stranded() -> int:
    return 1


@pipeline(enable_cache=False)
def unroutable():
    stranded()


@step(enable_cache=False)
def tick(seed: int, i: int) -> int:
    time.sleep(0.02)
    return i


@pipeline(enable_cache=False)
def wide(seed: int = 0, width: int = 200):
    for i in range(width):
        tick(seed, i)


@pipeline(enable_cache=False)
def small(x: int = 0):
    add_one(add_one(make(x=x)))


@step(enable_cache=False, timeout_s=1)
def overrun(seconds: float = 60.0) -> int:
    time.sleep(seconds)
    return 1


@pipeline(enable_cache=False)
def too_slow():
    overrun()


@step(enable_cache=False)
def guarded(x: int) -> Annotated[int, "value"]:
    """Only the code-integrity test runs this step (its code blob gets tampered with)."""
    return x * 3


@pipeline(enable_cache=False)
def integrity(x: int = 1):
    guarded(x)


@step(queue="nowhere", enable_cache=False)
def parked(v: int) -> Annotated[int, "value"]:
    """Waits on a queue nobody consumes, so a test can forge a message for it."""
    return v + 100


@pipeline(enable_cache=False)
def parked_after_make(x: int = 1):
    parked(make(x=x))
