"""Capture what a step prints and logs, and store it in the metadata store while it runs.

Worker processes run one step at a time (prefork children, solo GPU workers, the
embedded pool), so swapping ``sys.stdout``/``sys.stderr`` is safe here. Output is still
passed through to the original streams, so the worker's own log shows it once.

Each line gets its stream, time and a sequence number the moment it is complete, and
waits in a :class:`LogBuffer`. The process's writer thread (:class:`LogWriter`, started
by the first line any step of the process prints) stores a step's waiting lines every
:data:`FLUSH_INTERVAL_S` or as soon as :data:`BATCH_CHARS` have piled up, one transaction
per batch; a step that prints nothing is never handed to it and writes nothing. A failed
write keeps its lines for the next try. When the step returns, its :class:`LogShipper`
leaves the writer thread (waiting for a write in flight) and hands the rest to the
transaction that ends the attempt (its commit, or the record of its failure), so the last
lines cost no write of their own and none lands after the step shows finished. A step
that raises out of the capture (killed, interrupted) stores the rest itself.

What is kept of an attempt (:data:`MAX_LOG_CHARS`): its first :data:`HEAD_LOG_CHARS`
characters, then the newest ones; older lines in between are deleted as new ones
arrive, and readers show a marker where they were. The same bound holds for lines
waiting while the metadata store is unreachable.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stores.metadata import logs as step_logs
from stores.metadata.logs import LogLine, LogWrite

if TYPE_CHECKING:
    from stores.metadata.store import MetadataStore

log = logging.getLogger("zenml_workers.worker")

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

#: ``quiet`` is set on a thread while it writes to a passthrough stream (Celery's stdout
#: proxy logs each write, which must not be captured a second time) and for good on the
#: writer thread (its own warnings and the database driver's records are not the step's).
_local = threading.local()


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


class LogShipper:
    """Stores a :class:`LogBuffer`'s lines with ``write``, from this process's writer thread.

    ``write(batch)`` stores one batch and returns False when the attempt no longer runs
    (then nothing more is stored). It may raise: the batch's lines wait for the next try,
    after a pause that grows while the store keeps failing. The shipper joins the writer
    thread (:class:`LogWriter`) with its first line; with ``flush_interval_s=None`` it never
    does, and lines are stored only by :meth:`flush` and :meth:`close`.
    """

    def __init__(
        self,
        write: Callable[[LogBatch], bool] | None,
        *,
        what: str = "step",
        flush_interval_s: float | None = FLUSH_INTERVAL_S,
        batch_chars: int = BATCH_CHARS,
        buffer: LogBuffer | None = None,
    ) -> None:
        self.buffer = buffer if buffer is not None else LogBuffer()
        self._write = write
        self._what = what
        self.interval_s = flush_interval_s if write is not None else None
        self._batch_chars = batch_chars
        self._flush_lock = threading.Lock()
        self._writer: LogWriter | None = None
        self._closed = False
        self.failures = 0  # consecutive failed writes
        #: When the writer thread should store this shipper's lines next (monotonic seconds).
        self.due_at = 0.0

    # -- the step's side: never waits on the store ----------------------------------------

    def write(self, stream: str, text: str) -> None:
        waiting = self.buffer.write(stream, text)
        if waiting:
            self._added(waiting)

    def record(self, text: str, ts: float) -> None:
        waiting = self.buffer.record(text, ts)
        if waiting:
            self._added(waiting)

    def _added(self, waiting: int) -> None:
        writer = self._writer
        if writer is None:
            if self.interval_s is None or self._closed:
                return
            self.due_at = time.monotonic() + self.interval_s
            self._writer = writer = process_writer()
            writer.add(self)
        if waiting >= self._batch_chars and not self.failures:
            self.due_at = 0.0
            writer.wake()

    # -- the writer thread's side ----------------------------------------------------------

    def flush_if_due(self, now: float) -> None:
        """Store the waiting lines if their time has come (called by the writer thread)."""
        if self._closed or now < self.due_at:
            return
        assert self.interval_s is not None
        if not self._flush_lock.acquire(blocking=False):
            self.due_at = now + self.interval_s  # being written by the step's own thread
            return
        try:
            if self._closed:
                return
            stored = self._flush()
        finally:
            self._flush_lock.release()
        pause = self.interval_s
        if not stored:
            pause = min(self.interval_s * 2**self.failures, MAX_RETRY_DELAY_S)
        self.due_at = time.monotonic() + pause

    def flush(self) -> bool:
        """Store every waiting line, a batch per transaction; False when a write failed."""
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> bool:
        if self._write is None:
            return True
        while True:
            batch = self.buffer.take(self._batch_chars)
            if batch is None:
                if self.failures:
                    log.info(
                        "%s: log lines stored again after %d failed tries",
                        self._what,
                        self.failures,
                    )
                    self.failures = 0
                return True
            try:
                still_running = self._write(batch)
            except Exception as e:  # the store's trouble must never reach the step
                self.buffer.give_back(batch)
                self.failures += 1
                if self.failures == 1:
                    log.warning(
                        "%s: could not store %d log line(s) (%s: %s); keeping them for the next try",
                        self._what,
                        len(batch.lines),
                        type(e).__name__,
                        e,
                    )
                return False
            if not still_running:
                # Finished, cancelled or taken over by another attempt: its log is closed.
                self.buffer.discard()
                return True
            self.buffer.done(batch)

    def _leave(self) -> bool:
        """Leave the writer thread and wait for a write it has in flight (False: it hangs on
        a dead connection and is given up on). Afterwards only the caller writes lines."""
        self._closed = True
        if self._writer is not None:
            self._writer.remove(self)
        self.buffer.end()
        return self._flush_lock.acquire(timeout=CLOSE_TIMEOUT_S)

    def close_for_commit(self) -> LogWrite | None:
        """Leave the writer thread and return the rest, for the transaction that ends the
        attempt to store (None when there is none, or nowhere to store it: then it is in
        :meth:`leftover_text`)."""
        left = self._leave()
        try:
            if self._write is None:
                return None
            rest = self.buffer.take(max_chars=sys.maxsize)
            self._warn_dropped()
            return None if rest is None else LogWrite(rest.lines, rest.drop)
        finally:
            if left:
                self._flush_lock.release()

    def leftover_text(self) -> str:
        """What is still waiting, as text (with a marker where lines were dropped)."""
        return self.buffer.leftover()

    def close(self) -> str:
        """Leave the writer thread, store the rest, and return the text that could not be stored.

        Once this returns, nothing of this attempt is written any more: the writer thread
        has let go of it, and a write it had in flight has ended.
        """
        if self._leave():
            try:
                stored = self._flush()
            finally:
                self._flush_lock.release()
        else:
            stored = False
        leftover = self.buffer.leftover()
        self._warn_dropped()
        if leftover and self._write is not None and not stored:
            log.warning(
                "%s: the last %d character(s) of its log could not be stored as lines",
                self._what,
                len(leftover),
            )
        return leftover

    def _warn_dropped(self) -> None:
        if self.buffer.dropped_waiting:
            log.warning(
                "%s: dropped %d log line(s) that waited for the metadata store beyond the "
                "%d-character bound",
                self._what,
                self.buffer.dropped_waiting,
                MAX_LOG_CHARS,
            )


class LogWriter:
    """The thread that stores the waiting lines of every capture in one process.

    Started by the first line a step prints (see :func:`process_writer`) and kept for the
    process's next steps; it sleeps while no capture has lines waiting. Each capture's
    lines are stored when they are due (:data:`FLUSH_INTERVAL_S` after the previous write,
    or at once when a batch fills up).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._shippers: list[LogShipper] = []
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zw-logs", daemon=True)
        self._thread.start()

    def add(self, shipper: LogShipper) -> None:
        with self._lock:
            if shipper not in self._shippers:
                self._shippers.append(shipper)
        self._wake.set()

    def remove(self, shipper: LogShipper) -> None:
        with self._lock:
            if shipper in self._shippers:
                self._shippers.remove(shipper)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        _local.quiet = True
        while True:
            with self._lock:
                shippers = list(self._shippers)
            if shippers:
                timeout = min(sh.due_at for sh in shippers) - time.monotonic()
                if timeout > 0:
                    self._wake.wait(timeout)
            else:
                self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            for shipper in shippers:
                try:
                    shipper.flush_if_due(now)
                except Exception:  # never let one capture's trouble stop the others' writes
                    log.exception("log writer: storing a step's lines failed")


_writer: LogWriter | None = None
_writer_lock = threading.Lock()


def process_writer() -> LogWriter:
    """This process's :class:`LogWriter`, started on first use (and again after a fork)."""
    global _writer
    with _writer_lock:
        if _writer is None or _writer.pid != os.getpid():
            _writer = LogWriter()
        return _writer


def _forget_writer() -> None:
    # A forked child has none of its parent's threads, and its copy of the lock may be held.
    global _writer, _writer_lock
    _writer, _writer_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_writer)


class _Tee(io.TextIOBase):
    """A text stream that hands what it is given to the shipper and to ``passthrough``."""

    def __init__(self, shipper: LogShipper, stream: str, passthrough: Any) -> None:
        self._shipper = shipper
        self._add = shipper.buffer.write
        self._stream = stream
        self._passthrough = passthrough

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        waiting = self._add(self._stream, s)
        if waiting:
            self._shipper._added(waiting)
        out = self._passthrough
        if out is not None:
            quiet = getattr(_local, "quiet", False)
            _local.quiet = True
            try:
                out.write(s)
                if "\n" in s:
                    # Line by line, as a terminal would: a pool child may be killed before
                    # a block buffer would reach the worker's log.
                    out.flush()
            finally:
                _local.quiet = quiet
        return len(s)

    def flush(self) -> None:
        if self._passthrough is not None:
            self._passthrough.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._passthrough, "encoding", None) or "utf-8")


_FORMATTER = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class _RecordHandler(logging.Handler):
    """Hands formatted ``logging`` records to the shipper, except those a passthrough caused
    and zenml-workers' own below WARNING."""

    def __init__(self, shipper: LogShipper, level: int) -> None:
        super().__init__(level)
        self._shipper = shipper
        self.setFormatter(_FORMATTER)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(_local, "quiet", False):
            return
        if record.levelno < logging.WARNING and record.name.startswith("zenml_workers"):
            # Our own bookkeeping ("attempt 2 started on cpu@host") is in the step run's
            # record already, and would make every silent step write a line.
            return
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._shipper.record(text + "\n", record.created)


class CapturedLogs:
    """What a capture left behind, after the block: the lines still to store, when the
    transaction that ends the attempt stores them (``final``), and the text that could not
    be stored as lines (``leftover``, usually empty), for the step's record."""

    def __init__(self, shipper: LogShipper) -> None:
        self.shipper = shipper
        self.final: LogWrite | None = None
        self.leftover = ""


def store_writer(
    metadata: MetadataStore, step_run_id: str, attempt: int
) -> Callable[[LogBatch], bool]:
    """A ``write`` for :class:`LogShipper`: one transaction per batch on ``metadata``."""

    def write(batch: LogBatch) -> bool:
        with metadata.transaction() as s:
            return step_logs.append(s, step_run_id, attempt, batch)

    return write


@contextmanager
def capture_logs(
    write: Callable[[LogBatch], bool] | None = None,
    *,
    what: str = "step",
    passthrough: bool = True,
    level: int = logging.INFO,
    flush_interval_s: float | None = FLUSH_INTERVAL_S,
    final_with_commit: bool = False,
) -> Iterator[CapturedLogs]:
    """Capture stdout, stderr and ``logging`` records emitted inside the block.

    Lines are stored with ``write`` (see :func:`store_writer`) while the block runs, and
    the rest when it ends; with ``final_with_commit``, a block that ends normally leaves
    the rest in :attr:`CapturedLogs.final` for the caller's commit to store (one write
    fewer), while one that raises stores it itself. Without ``write`` lines are only kept,
    and all of them (within the bound) end up in :attr:`CapturedLogs.leftover`.
    """
    shipper = LogShipper(write, what=what, flush_interval_s=flush_interval_s)
    captured = CapturedLogs(shipper)
    handler = _RecordHandler(shipper, level)
    root = logging.getLogger()
    old_out, old_err, old_level = sys.stdout, sys.stderr, root.level
    sys.stdout = _Tee(shipper, "stdout", old_out if passthrough else None)  # type: ignore[assignment]
    sys.stderr = _Tee(shipper, "stderr", old_err if passthrough else None)  # type: ignore[assignment]
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    ended = False
    try:
        yield captured
        ended = True
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        root.removeHandler(handler)
        root.setLevel(old_level)
        # After the streams are back: nothing the final write logs is captured.
        if ended and final_with_commit:
            captured.final = shipper.close_for_commit()
            captured.leftover = shipper.leftover_text()
        else:
            captured.leftover = shipper.close()
