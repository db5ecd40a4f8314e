"""Capture what a step prints and logs, so it is stored with its step run.

Worker processes run one step at a time (prefork children, solo GPU workers,
the embedded pool), so swapping ``sys.stdout``/``sys.stderr`` is safe here.
Output is still passed through to the original streams, so ``celery worker``
logs keep showing it.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Most characters of a step's output kept in the metadata store (the tail is kept).
MAX_LOG_CHARS = 1_000_000


class _Tee(io.TextIOBase):
    def __init__(self, buffer: io.StringIO, passthrough: Any) -> None:
        self._buffer = buffer
        self._passthrough = passthrough

    def write(self, s: str) -> int:
        self._buffer.write(s)
        if self._passthrough is not None:
            self._passthrough.write(s)
        return len(s)

    def flush(self) -> None:
        if self._passthrough is not None:
            self._passthrough.flush()

    def isatty(self) -> bool:
        return False


class CapturedLogs:
    """The text captured so far (stdout, stderr and log records, interleaved)."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    @property
    def text(self) -> str:
        value = self.buffer.getvalue()
        if len(value) > MAX_LOG_CHARS:
            return "[... truncated ...]\n" + value[-MAX_LOG_CHARS:]
        return value


@contextmanager
def capture_logs(*, passthrough: bool = True, level: int = logging.INFO) -> Iterator[CapturedLogs]:
    """Capture stdout, stderr and ``logging`` records emitted inside the block."""
    captured = CapturedLogs()
    handler = logging.StreamHandler(captured.buffer)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_out, old_err, old_level = sys.stdout, sys.stderr, root.level
    sys.stdout = _Tee(captured.buffer, old_out if passthrough else None)  # type: ignore[assignment]
    sys.stderr = _Tee(captured.buffer, old_err if passthrough else None)  # type: ignore[assignment]
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    try:
        yield captured
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        root.removeHandler(handler)
        root.setLevel(old_level)
