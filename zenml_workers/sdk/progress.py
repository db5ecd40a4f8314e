"""Progress of a run while ``wait()`` blocks: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class ProgressReporter:
    """Shows steps finished out of total; prints warnings (e.g. a queue with no worker) once."""

    def __init__(self, run_id: str, *, enabled: bool) -> None:
        self.run_id = run_id
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None
        self._last: tuple[int, int] | None = None
        self._last_line = time.monotonic()  # the first plain line comes after 2 s, or at the end

    def update(self, done: int, total: int) -> None:
        if not self.enabled or (done, total) == self._last:
            return
        self._last = (done, total)
        if sys.stderr.isatty():
            if self._bar is None:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self._bar = Progress(
                    TextColumn(f"run {self.run_id[:8]}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("steps"),
                    TimeElapsedColumn(),
                    transient=False,
                )
                self._bar.start()
                self._task = self._bar.add_task("steps", total=total)
            self._bar.update(self._task, completed=done, total=total)
        elif time.monotonic() - self._last_line > 2.0 or done == total:
            self._last_line = time.monotonic()
            print(f"run {self.run_id}: {done}/{total} steps finished", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(f"[yellow]warning:[/yellow] {message}")
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
