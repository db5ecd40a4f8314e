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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from stores.metadata import logs as step_logs
from stores.metadata.logs import LogWrite
from zenml_workers.worker.logbuffer import (
    BATCH_CHARS,
    CLOSE_TIMEOUT_S,
    FLUSH_INTERVAL_S,
    MAX_LOG_CHARS,
    MAX_RETRY_DELAY_S,
    LogBatch,
    LogBuffer,
)

if TYPE_CHECKING:
    from stores.metadata.store import MetadataStore

log = logging.getLogger("zenml_workers.worker")


#: ``quiet`` is set on a thread while it writes to a passthrough stream (Celery's stdout
#: proxy logs each write, which must not be captured a second time) and for good on the
#: writer thread (its own warnings and the database driver's records are not the step's).
_local = threading.local()


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
