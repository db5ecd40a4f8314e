"""A step that prints and logs, for the captured-logs tests."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step

logger = logging.getLogger("tests.chatty")


@step
def chatty(n: int = 2) -> Annotated[int, "value"]:
    """Print to stdout and stderr and log at INFO and WARNING."""
    print(f"chatty stdout line n={n}")
    print(f"chatty stderr line n={n}", file=sys.stderr)
    logger.info("chatty info record n=%d", n)
    logger.warning("chatty warning record n=%d", n)
    return n


@pipeline
def chatty_pipeline(n: int = 2) -> None:
    """A single chatty step."""
    chatty(n=n)
