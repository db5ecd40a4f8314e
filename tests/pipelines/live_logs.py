"""Pipelines for the live-log tests; workers import this module by name.

``ticking`` prints, writes to stderr and logs, then writes ``<marker_dir>/started`` and
blocks until ``<marker_dir>/release`` exists, so a test can read its first lines while it
still runs. ``flaky`` fails its first attempt (after printing) and succeeds on the second.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

from zenml_workers import pipeline, step

HOLD_LIMIT_S = 120.0

logger = logging.getLogger("tests.live_logs")


@step(enable_cache=False)
def ticking(marker_dir: str, ticks: int = 3) -> Annotated[int, "ticks"]:
    """``ticks`` lines ``tick I`` on stdout, one on stderr, one log record; then waits."""
    for i in range(ticks):
        print(f"tick {i}")
    print("a stderr line", file=sys.stderr)
    logger.warning("a log record")
    d = Path(marker_dir)
    (d / "started").write_text(str(os.getpid()))
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (d / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("released")
    return ticks


@pipeline(enable_cache=False)
def ticker(marker_dir: str = "", ticks: int = 3) -> None:
    ticking(marker_dir, ticks=ticks)


@step(enable_cache=False, retries=1)
def flaky(marker_dir: str) -> Annotated[int, "value"]:
    """Prints which attempt it is; the first one raises."""
    tried = Path(marker_dir) / "tried"
    first = not tried.exists()
    tried.write_text("1")
    print(f"output of attempt {'one' if first else 'two'}")
    if first:
        raise RuntimeError("the first attempt fails")
    return 2


@pipeline(enable_cache=False)
def retried(marker_dir: str = "") -> None:
    flaky(marker_dir)
