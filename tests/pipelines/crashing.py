"""Steps that take their worker process down with them."""

from __future__ import annotations

import os
import signal

from zenml_workers import pipeline, step


@step(enable_cache=False)
def die(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


@step(enable_cache=False)
def passthrough(x: int) -> int:
    return x


@pipeline(enable_cache=False)
def crashing(x: int = 1):
    passthrough(die(x))


@pipeline(enable_cache=False)
def healthy(x: int = 1):
    passthrough(x)
