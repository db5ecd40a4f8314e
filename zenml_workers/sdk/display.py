"""Where a run's progress goes: a terminal, a notebook cell or a log.

Each display turns the pure renderings of :mod:`zenml_workers.sdk.progress` into output:
rich's live view on a terminal, one updating ``IPython.display`` output in a Jupyter kernel,
plain lines otherwise. :func:`choose_display` picks one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any, Protocol

from zenml_workers.sdk.progress import (
    Snapshot,
    final_html,
    render_html,
    render_line,
    render_lines,
)

#: Shortest gap between two plain progress lines, in seconds.
PLAIN_INTERVAL_S = 2.0


class Display(Protocol):
    """Where progress goes: a terminal, a notebook cell or a log."""

    def show(self, snapshot: Snapshot) -> None: ...

    def warn(self, message: str) -> None: ...

    def finish(self, line: str) -> None: ...

    def close(self) -> None: ...


class PlainDisplay:
    """One line per change, at most one per :data:`PLAIN_INTERVAL_S` (the first at once)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._last_state: str | None = None
        self._last_at = float("-inf")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def show(self, snapshot: Snapshot) -> None:
        state = render_line(_without_clock(snapshot))
        now = time.monotonic()
        if state == self._last_state or now - self._last_at < PLAIN_INTERVAL_S:
            return
        self._last_state, self._last_at = state, now
        self._print(render_line(snapshot))

    def warn(self, message: str) -> None:
        self._print(f"warning: {message}")

    def finish(self, line: str) -> None:
        self._print(line)

    def close(self) -> None:
        return None


def _without_clock(snapshot: Snapshot) -> Snapshot:
    return replace(snapshot, elapsed_s=None)


class TerminalDisplay:
    """rich's live view on a terminal; the last frame and the final line stay on screen."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console

        self.console = Console(file=stream)
        self._live: Any = None

    def _renderable(self, snapshot: Snapshot) -> Any:
        from rich.text import Text

        first, *rest = render_lines(snapshot)
        text = Text()
        text.append(first, style="bold")
        for line in rest:
            text.append("\n")
            text.append(line, style="yellow" if line.startswith("waiting:") else "")
        return text

    def show(self, snapshot: Snapshot) -> None:
        if self._live is None:
            from rich.live import Live

            self._live = Live(self._renderable(snapshot), console=self.console, auto_refresh=False)
            self._live.start(refresh=True)
        else:
            self._live.update(self._renderable(snapshot), refresh=True)

    def warn(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)

    def finish(self, line: str) -> None:
        self.close()
        self.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class _Html:
    """What ``IPython.display`` shows: HTML in a notebook, the text elsewhere."""

    def __init__(self, markup: str, text: str) -> None:
        self.markup, self.text = markup, text

    def _repr_html_(self) -> str:
        return self.markup

    def __repr__(self) -> str:
        return self.text


class NotebookDisplay:
    """One output in a notebook cell, updated in place (``display(..., display_id=True)``)."""

    def __init__(self, display: Callable[..., Any]) -> None:
        self._display = display
        self._handle: Any = None
        self._warnings: list[str] = []
        self._last: Snapshot | None = None

    def _put(self, markup: str, text: str) -> None:
        obj = _Html(markup, text)
        if self._handle is None:
            self._handle = self._display(obj, display_id=True)
        else:
            self._handle.update(obj)

    def show(self, snapshot: Snapshot) -> None:
        self._last = snapshot
        self._put(render_html(snapshot, warnings=self._warnings), "\n".join(render_lines(snapshot)))

    def warn(self, message: str) -> None:
        self._warnings.append(message)
        if self._last is not None:
            self.show(self._last)
        else:
            self._put(final_html("", warnings=self._warnings), f"warning: {message}")

    def finish(self, line: str) -> None:
        self._put(final_html(line, warnings=self._warnings), line)

    def close(self) -> None:
        return None


def kernel_display() -> Callable[..., Any] | None:
    """IPython's ``display`` when this process is a Jupyter kernel, else None.

    IPython is never imported here: a kernel has imported it already.
    """
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    if shell is None or getattr(shell, "kernel", None) is None:
        return None  # a plain interpreter or a terminal IPython
    from IPython.display import display

    return display


def choose_display(stream: IO[str] | None = None) -> Display:
    """A notebook display in a Jupyter kernel, rich on a terminal, plain lines otherwise."""
    stream = sys.stderr if stream is None else stream
    display = kernel_display()
    if display is not None:
        return NotebookDisplay(display)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return TerminalDisplay(stream)
    return PlainDisplay(stream)
