"""One step attempt's output lines waiting to be stored: ordered, numbered, bounded.

Pure bookkeeping (no threads of its own, no I/O): :mod:`zenml_workers.worker.logcapture`
fills a :class:`LogBuffer` from the step's streams and ships its batches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stores.metadata import logs as step_logs
from stores.metadata.logs import LogLine, LogWrite

#: Most characters of one attempt's output kept in the metadata store.
MAX_LOG_CHARS = 1_000_000
#: Of those, the first characters of the attempt, always kept; the rest is the newest output.
HEAD_LOG_CHARS = 100_000
#: A longer line (a progress bar without newlines, a huge repr) is stored in pieces of this size.
MAX_LINE_CHARS = 8_192
#: Seconds between two writes of waiting lines.
FLUSH_INTERVAL_S = 0.5
#: Characters per write transaction; this many waiting wakes the writer before its interval.
BATCH_CHARS = 65_536
#: Longest pause between writes while the metadata store keeps failing them, in seconds.
MAX_RETRY_DELAY_S = 5.0
#: How long the end of a step waits for a write in flight, in seconds.
CLOSE_TIMEOUT_S = 5.0

_LINE_ENDS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # str.splitlines' boundaries


@dataclass(frozen=True)
class LogBatch(LogWrite):
    """Lines to store in one transaction, and the stored lines to delete with them."""

    _entry: list[int] | None = field(default=None, repr=False, compare=False)


class LogBuffer:
    """One attempt's lines waiting to be stored, in order, within :data:`MAX_LOG_CHARS`.

    Thread-safe and free of I/O: a :class:`LogShipper` takes batches, writes them and
    reports back (:meth:`done`, :meth:`give_back`). Lines are split on line endings
    (``\\n``, ``\\r`` for progress bars, ...); a line still open stays here until it ends,
    grows past :data:`MAX_LINE_CHARS` or the step ends.
    """

    def __init__(
        self,
        *,
        max_chars: int = MAX_LOG_CHARS,
        head_chars: int = HEAD_LOG_CHARS,
        max_line_chars: int = MAX_LINE_CHARS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= head_chars <= max_chars - max_line_chars:
            raise ValueError(
                f"log bound: head_chars ({head_chars}) must leave room for a line "
                f"({max_line_chars}) within max_chars ({max_chars})"
            )
        self._tail_max = max_chars - head_chars
        self._head_max = head_chars
        self._line_max = max_line_chars
        self._clock = clock
        self._lock = threading.Lock()
        self._seq = 0
        self._open: dict[str, list[str]] = {}  # per stream: the pieces of a line not ended yet
        self._open_chars: dict[str, int] = {}
        self._head: deque[LogLine] = deque()  # waiting lines of the always-kept head
        self._tail: deque[LogLine] = deque()  # waiting lines after it
        self._head_chars = 0  # waiting, of the head
        self._tail_chars = 0  # waiting, of the tail
        self._head_size = 0  # of every head line, waiting or stored
        #: The first seq past the head, once a line did not fit into it.
        self._head_end: int | None = None
        #: [last seq, chars] of each tail batch written or being written, oldest first.
        self._stored: deque[list[int]] = deque()
        self._stored_chars = 0
        self._cut = 0  # tail lines below this seq are dropped
        self._cut_written = 0  # and those below this one are deleted from the store too
        self._written_seq = -1  # the highest seq stored
        self.dropped_waiting = 0  # lines dropped before they could be stored
        self.closed = False

    @property
    def waiting_chars(self) -> int:
        return self._head_chars + self._tail_chars

    def write(self, stream: str, text: str) -> int:
        """Add what a stream was given; returns the characters waiting if this ended a line,
        else 0 (nothing new to store; also once closed)."""
        if not text:
            return 0
        with self._lock:
            if self.closed:
                return 0
            pieces = self._open.get(stream)
            if pieces is None:
                pieces = self._open[stream] = []
            if "\n" not in text and "\r" not in text:
                # The common half of a print(): its text without the line end. No clock read.
                pieces.append(text)
                self._open_chars[stream] = self._open_chars.get(stream, 0) + len(text)
                if self._open_chars[stream] < self._line_max:
                    return 0
                self._cap_open(stream, pieces, self._clock())
                return self._head_chars + self._tail_chars
            now = self._clock()
            if pieces:
                pieces.append(text)
                text = "".join(pieces)
                pieces.clear()
            self._open_chars[stream] = 0
            if text[-1] == "\n" and "\r" not in text and text.count("\n") == 1:
                self._add(stream, text, now)  # one whole line: the other half of a print()
                return self._head_chars + self._tail_chars
            lines = text.splitlines(keepends=True)
            rest = lines.pop() if lines[-1][-1] not in _LINE_ENDS else ""
            for line in lines:
                self._add(stream, line, now)
            if rest:
                pieces.append(rest)
                self._open_chars[stream] = len(rest)
                self._cap_open(stream, pieces, now)
            return self._head_chars + self._tail_chars

    def _cap_open(self, stream: str, pieces: list[str], now: float) -> None:
        """Store an open line in pieces of :data:`MAX_LINE_CHARS` once it is that long."""
        if self._open_chars[stream] < self._line_max:
            return
        joined = "".join(pieces)
        cut = len(joined) - len(joined) % self._line_max
        self._add(stream, joined[:cut], now)
        pieces[:] = [joined[cut:]] if cut < len(joined) else []
        self._open_chars[stream] = len(joined) - cut

    def record(self, text: str, ts: float) -> int:
        """Add one formatted ``logging`` record (stream ``log``); returns the characters waiting."""
        with self._lock:
            if self.closed:
                return 0
            self._add("log", text, ts)
            return self.waiting_chars

    def _add(self, stream: str, text: str, ts: float) -> None:
        if len(text) > self._line_max:
            for start in range(0, len(text), self._line_max):
                self._add(stream, text[start : start + self._line_max], ts)
            return
        seq, size = self._seq, len(text)
        self._seq = seq + 1
        if self._head_end is None and self._head_size + size <= self._head_max:
            self._head.append(LogLine(seq, stream, ts, text))
            self._head_chars += size
            self._head_size += size
            return
        if self._head_end is None:
            self._head_end = seq
        self._tail.append(LogLine(seq, stream, ts, text))
        self._tail_chars += size
        if self._stored_chars + self._tail_chars > self._tail_max:
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest tail lines, stored ones first, until the tail fits its bound."""
        while self._stored_chars + self._tail_chars > self._tail_max:
            if self._stored:
                last_seq, chars = self._stored.popleft()
                self._stored_chars -= chars
                self._cut = last_seq + 1
            else:
                line = self._tail.popleft()
                self._tail_chars -= len(line.text)
                self._cut = line.seq + 1
                self.dropped_waiting += 1

    def end(self) -> None:
        """The step ended: lines still open become lines; nothing more is accepted."""
        now = self._clock()
        with self._lock:
            for stream, pieces in self._open.items():
                if pieces:
                    self._add(stream, "".join(pieces), now)
            self._open.clear()
            self.closed = True

    def take(self, max_chars: int = BATCH_CHARS) -> LogBatch | None:
        """The oldest waiting lines (about ``max_chars``), or None when nothing is to be written.

        Until :meth:`done` or :meth:`give_back`, their tail part counts as stored.
        """
        with self._lock:
            lines: list[LogLine] = []
            chars = 0
            while self._head and chars < max_chars:
                line = self._head.popleft()
                lines.append(line)
                chars += len(line.text)
            self._head_chars -= chars
            tail_chars = 0
            while self._tail and chars + tail_chars < max_chars:
                line = self._tail.popleft()
                lines.append(line)
                tail_chars += len(line.text)
            self._tail_chars -= tail_chars
            drop = None
            if self._head_end is not None and self._cut > max(self._cut_written, self._head_end):
                drop = (max(self._cut_written, self._head_end), self._cut)
            if not lines and drop is None:
                return None
            entry = None
            if tail_chars:
                entry = [lines[-1].seq, tail_chars]
                self._stored.append(entry)
                self._stored_chars += tail_chars
            return LogBatch(tuple(lines), drop, entry)

    def done(self, batch: LogBatch) -> None:
        """``batch`` is stored."""
        with self._lock:
            if batch.drop is not None:
                self._cut_written = max(self._cut_written, batch.drop[1])
            if batch.lines:
                self._written_seq = max(self._written_seq, batch.lines[-1].seq)

    def give_back(self, batch: LogBatch) -> None:
        """Writing ``batch`` failed: its lines wait again, in front (less any dropped since)."""
        with self._lock:
            entry = batch._entry
            if entry is not None and self._stored and self._stored[-1] is entry:
                self._stored.pop()
                self._stored_chars -= entry[1]
            head_end = self._head_end
            head = [ln for ln in batch.lines if head_end is None or ln.seq < head_end]
            # Tail lines dropped while they were being written stay dropped.
            tail = [ln for ln in batch.lines[len(head) :] if ln.seq >= self._cut]
            self._head.extendleft(reversed(head))
            self._head_chars += sum(len(ln.text) for ln in head)
            self._tail.extendleft(reversed(tail))
            self._tail_chars += sum(len(ln.text) for ln in tail)
            self._trim()

    def discard(self) -> None:
        """The attempt has ended elsewhere: drop everything, accept nothing more."""
        with self._lock:
            self.closed = True
            self._head.clear()
            self._tail.clear()
            self._open.clear()
            self._head_chars = self._tail_chars = 0

    def leftover(self) -> str:
        """What is still waiting, as text (with a marker for lines dropped before it), and clear it."""
        with self._lock:
            lines = [*self._head, *self._tail]
            self._head.clear()
            self._tail.clear()
            self._head_chars = self._tail_chars = 0
            return step_logs.render(lines, after_seq=self._written_seq)
