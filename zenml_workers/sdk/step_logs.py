"""Reading a step's captured output: what is stored so far, line by line, or followed live."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zenml_workers.errors import NotFoundError

if TYPE_CHECKING:
    from zenml_workers.sdk.client import RunView
    from zenml_workers.sdk.stack import Stack


class LogsMixin:
    """``Client`` methods ``logs``, ``log_lines`` and ``follow_logs``."""

    _stack: Stack

    def get_run(self, run_id: str) -> RunView:  # provided by Client
        raise NotImplementedError

    def logs(self, run_id: str, step: str, *, attempt: int | None = None) -> str:
        """Captured stdout, stderr and logging of a step's latest attempt (or of ``attempt``),
        as stored so far: a running step's lines arrive about every half second.

        Raises:
            NotFoundError: no such run, or the run has no step with that invocation id.
        """
        return self._text_of(self._step_run_id(run_id, step), attempt)

    def log_lines(
        self, run_id: str, step: str, *, attempt: int | None = None, after_seq: int = -1
    ) -> list[LogLineView]:
        """The stored lines of a step's latest attempt (or of ``attempt``) after ``after_seq``,
        each with its stream and time. Text kept with the step's record (the whole output of
        a step run before live logs existed) comes last, with stream ``""``.

        Raises:
            NotFoundError: no such run, or the run has no step with that invocation id.
        """
        from stores.metadata import logs as slogs

        step_run_id = self._step_run_id(run_id, step)
        with self._stack.metadata.read() as s:
            st = slogs.state(s, step_run_id)
            number = st.attempt if attempt is None else attempt
            lines = slogs.read(s, step_run_id, number, after_seq=after_seq)
        views = _log_views(number, lines, after_seq)
        stored = st.stored_text_of(number)
        if stored:
            views.append(LogLineView(number, -1, "", None, stored))
        return views

    def follow_logs(
        self, run_id: str, step: str, *, attempt: int | None = None, poll_s: float = 0.25
    ) -> Iterator[LogLineView]:
        """Lines of a step as they are stored, until it ends: what exists first, then new lines
        as they arrive (polling every ``poll_s`` seconds). Follows the latest attempt and
        moves on to the next one when the step is retried; with ``attempt``, ends with that
        attempt. A step that has ended gives what it stored and stops at once.

        Raises:
            NotFoundError: no such run, or the run has no step with that invocation id.
        """
        import time

        from stores.metadata import logs as slogs

        step_run_id = self._step_run_id(run_id, step)
        following, cursor = attempt, -1
        while True:
            with self._stack.metadata.read() as s:
                # The state first: every line of an attempt that it shows ended is stored.
                st = slogs.state(s, step_run_id)
                if following is None:
                    following = st.attempt
                lines = slogs.read(s, step_run_id, following, after_seq=cursor, limit=_LOG_PAGE)
            yield from _log_views(following, lines, cursor)
            if lines:
                cursor = lines[-1].seq
            if len(lines) == _LOG_PAGE:
                continue
            if st.attempt > following:
                if attempt is not None:
                    return
                following, cursor = following + 1, -1  # that attempt ended; the next one ran
                continue
            if st.ended or (attempt is not None and st.attempt == following and not st.running):
                stored = st.stored_text_of(following)
                if stored:
                    yield LogLineView(following, -1, "", None, stored)
                return
            time.sleep(poll_s)

    def _step_run_id(self, run_id: str, step: str) -> str:
        run = self.get_run(run_id)
        if step not in run.steps:
            raise NotFoundError(
                f"run {run.id} has no step {step!r}; its steps are {', '.join(run.steps)}"
            )
        return run.steps[step].id

    def _text_of(self, step_run_id: str, attempt: int | None) -> str:
        from stores.metadata import logs as slogs

        with self._stack.metadata.read() as s:
            st = slogs.state(s, step_run_id)
            number = st.attempt if attempt is None else attempt
            lines = slogs.read(s, step_run_id, number)
        return slogs.render(lines) + st.stored_text_of(number)


#: Lines read per query while following a step.
_LOG_PAGE = 5_000


@dataclass(frozen=True)
class LogLineView:
    """One stored line of a step attempt's output (a very long line comes in pieces)."""

    attempt: int
    #: Its position in the attempt, from 0; -1 for text kept with the step's record.
    seq: int
    #: ``stdout``, ``stderr`` or ``log`` (a ``logging`` record); ``""`` for text kept with
    #: the step's record (older steps' whole output, or what a worker could not store as lines).
    stream: str
    #: When it was printed or logged, epoch seconds; None for text kept with the step's record.
    ts: float | None
    #: The text with its line ending.
    text: str
    #: Lines dropped right before this one to stay within the kept size (readers show a marker).
    dropped_before: int = 0

    def render(self) -> str:
        """The text as ``zw logs`` prints it, after a marker if lines were dropped before it."""
        if not self.dropped_before:
            return self.text
        from stores.metadata.logs import dropped_marker

        return dropped_marker(self.dropped_before) + self.text


def _log_views(attempt: int, lines: list[Any], after_seq: int) -> list[LogLineView]:
    views, expected = [], after_seq + 1
    for line in lines:
        views.append(
            LogLineView(attempt, line.seq, line.stream, line.ts, line.text, line.seq - expected)
        )
        expected = line.seq + 1
    return views
