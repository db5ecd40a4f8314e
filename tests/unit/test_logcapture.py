"""A step's log capture: lines in order with their streams, batched, bounded, retried, and
never captured twice. No database: the writes go to an in-memory store with the same
rules as ``step_logs`` (one row per (seq), a repeated seq is skipped)."""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Callable

import pytest

from stores.errors import MetadataStoreUnavailableError
from stores.metadata.logs import LogLine, render
from zenml_workers.worker.logbuffer import LogBatch, LogBuffer
from zenml_workers.worker.logcapture import LogShipper, capture_logs


class FakeStore:
    """``step_logs`` of one attempt: rows by seq; ``fail`` decides per write whether it raises."""

    def __init__(
        self, fail: Callable[[int], bool] = lambda _n: False, *, land_then_fail: bool = False
    ) -> None:
        self.rows: dict[int, LogLine] = {}
        self.writes = 0
        self.running = True
        self._fail = fail
        self._land_then_fail = land_then_fail
        self.written = threading.Event()

    def write(self, batch: LogBatch) -> bool:
        self.writes += 1
        failing = self._fail(self.writes)
        if failing and not self._land_then_fail:
            raise MetadataStoreUnavailableError(
                "cannot reach the metadata store at postgresql://db"
            )
        if not self.running:
            return False
        if batch.drop is not None:
            for seq in range(*batch.drop):
                self.rows.pop(seq, None)
        for line in batch.lines:
            self.rows.setdefault(line.seq, line)  # ON CONFLICT DO NOTHING
        if failing:  # the COMMIT landed, but the connection broke before it said so
            raise MetadataStoreUnavailableError("connection to postgresql://db lost during COMMIT")
        self.written.set()
        return True

    def lines(self) -> list[LogLine]:
        return [self.rows[k] for k in sorted(self.rows)]

    def text(self) -> str:
        return render(self.lines())


def _clock() -> Callable[[], float]:
    ticks = iter(range(1, 1_000_000))
    return lambda: float(next(ticks))


def test_log_buffer_keeps_lines_in_order_with_their_streams_and_times() -> None:
    buf = LogBuffer(clock=_clock())

    buf.write("stdout", "a\nb")
    buf.write("stderr", "x\n")
    buf.write("stdout", "c\n")
    buf.record("2026 INFO m: rec\n", 99.0)
    batch = buf.take()

    assert batch is not None
    assert [(ln.seq, ln.stream, ln.text) for ln in batch.lines] == [
        (0, "stdout", "a\n"),
        (1, "stderr", "x\n"),
        (2, "stdout", "bc\n"),  # the open "b" waited for its line end
        (3, "log", "2026 INFO m: rec\n"),
    ]
    assert [ln.ts for ln in batch.lines] == [1.0, 2.0, 3.0, 99.0]
    assert buf.take() is None


def test_log_buffer_splits_progress_bars_and_long_lines() -> None:
    buf = LogBuffer(max_chars=1000, head_chars=100, max_line_chars=10)

    buf.write("stderr", " 10%\r 20%\r")
    buf.write("stdout", "y" * 25)  # no line end: stored in pieces of 10, the rest stays open
    batch = buf.take()
    assert batch is not None
    assert [ln.text for ln in batch.lines] == [" 10%\r", " 20%\r", "y" * 10, "y" * 10]

    buf.end()  # the step returned: the open rest is a line too
    batch = buf.take()
    assert batch is not None
    assert [ln.text for ln in batch.lines] == ["y" * 5]
    assert buf.write("stdout", "late\n") == 0


def test_log_buffer_keeps_the_head_and_the_newest_lines_within_its_bound() -> None:
    store = FakeStore()
    shipper = LogShipper(
        store.write,
        flush_interval_s=None,
        batch_chars=30,
        buffer=LogBuffer(max_chars=100, head_chars=20, max_line_chars=10),
    )
    for i in range(200):
        shipper.write("stdout", f"line {i:03d}\n")  # 9 characters each
        if i % 7 == 0:
            shipper.flush()
    assert shipper.close() == ""

    kept = store.lines()
    assert [ln.text for ln in kept[:2]] == ["line 000\n", "line 001\n"]  # the head
    assert kept[-1].text == "line 199\n"  # the newest
    assert sum(len(ln.text) for ln in kept) <= 100 + 30  # the bound, plus one batch at most
    text = store.text()
    assert "line 001\n[... " in text and " line(s) dropped" in text
    assert text.count("line 150\n") <= 1


def test_log_buffer_bounds_lines_waiting_for_an_unreachable_store() -> None:
    shipper = LogShipper(
        FakeStore(fail=lambda _n: True).write,
        flush_interval_s=None,
        buffer=LogBuffer(max_chars=100, head_chars=20, max_line_chars=10),
    )
    for i in range(500):
        shipper.write("stdout", f"line {i:03d}\n")
        assert shipper.buffer.waiting_chars <= 100
        if i % 50 == 0:
            assert shipper.flush() is False

    leftover = shipper.close()

    assert leftover.startswith("line 000\nline 001\n[... ")
    assert leftover.endswith("line 499\n")
    assert shipper.buffer.dropped_waiting > 0


def test_log_shipper_retries_a_failed_write_with_the_same_lines() -> None:
    store = FakeStore(fail=lambda n: n == 1)
    shipper = LogShipper(store.write, flush_interval_s=None)
    shipper.write("stdout", "one\ntwo\n")

    assert shipper.flush() is False  # the store blipped: the lines wait
    assert store.rows == {}
    shipper.write("stderr", "three\n")
    assert shipper.flush() is True

    assert [(ln.seq, ln.stream, ln.text) for ln in store.lines()] == [
        (0, "stdout", "one\n"),
        (1, "stdout", "two\n"),
        (2, "stderr", "three\n"),
    ]
    assert shipper.failures == 0


def test_log_shipper_stores_each_line_once_when_a_commit_landed_but_failed() -> None:
    store = FakeStore(fail=lambda n: n == 1, land_then_fail=True)
    shipper = LogShipper(store.write, flush_interval_s=None)
    shipper.write("stdout", "one\n")

    assert shipper.flush() is False
    shipper.write("stdout", "two\n")
    assert shipper.close() == ""

    assert store.text() == "one\ntwo\n"
    assert store.writes == 2


def test_log_shipper_stops_storing_once_the_attempt_ended() -> None:
    store = FakeStore()
    shipper = LogShipper(store.write, flush_interval_s=None)
    shipper.write("stdout", "before\n")
    shipper.flush()
    store.running = False  # cancelled, or another attempt took over

    shipper.write("stdout", "after\n")
    shipper.flush()
    shipper.write("stdout", "much later\n")

    assert shipper.close() == ""
    assert store.text() == "before\n"


def test_capture_logs_writes_nothing_and_starts_no_thread_for_a_silent_step() -> None:
    store = FakeStore()

    with capture_logs(store.write) as logs:
        sum(range(10))
        # The worker's own bookkeeping is in the step run's record, not its log.
        logging.getLogger("zenml_workers.worker").info("run r step s attempt 1 started on h")

    assert store.writes == 0
    assert logs.shipper._writer is None  # never handed to the writer thread
    assert logs.leftover == ""


def test_capture_logs_stores_prints_stderr_and_records_in_the_background() -> None:
    store = FakeStore()

    with capture_logs(store.write, passthrough=False, flush_interval_s=0.01) as logs:
        print("tick 1")
        print("oops", file=sys.stderr)
        logging.getLogger("tests.logcapture").warning("careful %d", 2)
        # The writer thread stores them while the block still runs.
        assert store.written.wait(30), "the writer thread stored nothing"
        print("tick 2")

    assert logs.leftover == ""
    assert [(ln.stream, ln.text.split(": ")[-1]) for ln in store.lines()] == [
        ("stdout", "tick 1\n"),
        ("stderr", "oops\n"),
        ("log", "careful 2\n"),
        ("stdout", "tick 2\n"),
    ]
    assert store.lines()[2].text.split(" ")[2:4] == ["WARNING", "tests.logcapture:"]


class LoggingProxy(io.TextIOBase):
    """Like Celery's ``worker_redirect_stdouts``: every write becomes a log record."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("celery.redirected")

    def write(self, s: str) -> int:
        if s.strip():
            self.logger.warning(s.rstrip("\n"))
        return len(s)


def test_capture_logs_does_not_capture_what_a_passthrough_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdout", LoggingProxy())
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("celery.redirected").addHandler(handler)
    try:
        with capture_logs(flush_interval_s=None) as logs:
            print("tick 7")
    finally:
        logging.getLogger("celery.redirected").removeHandler(handler)

    assert logs.leftover == "tick 7\n"  # once, as stdout; not again as a celery.redirected record
    assert [r.getMessage() for r in seen] == ["tick 7"]  # the worker's own log still shows it


def test_capture_logs_hands_what_it_could_not_store_to_the_commit() -> None:
    store = FakeStore(fail=lambda _n: True)

    with capture_logs(store.write, passthrough=False, flush_interval_s=None) as logs:
        print("first")
        print("last", end="")

    assert logs.leftover == "first\nlast"
    assert store.rows == {}


def test_log_shipper_keeps_its_own_warnings_out_of_the_step_log() -> None:
    store = FakeStore(fail=lambda n: n == 1)

    with capture_logs(store.write, passthrough=False, flush_interval_s=0.01) as logs:
        print("tick")
        assert store.written.wait(30), "the retry never stored the line"

    assert store.text() == "tick\n"  # the writer's "could not store" warning is not in it
    assert logs.leftover == ""


def test_capture_logs_leaves_the_last_lines_to_the_commit() -> None:
    store = FakeStore()

    with capture_logs(
        store.write, passthrough=False, flush_interval_s=None, final_with_commit=True
    ) as logs:
        print("one")
        print("two", end="")

    assert store.writes == 0  # no write of their own: the step's commit stores them
    assert logs.final is not None
    assert [(ln.seq, ln.text) for ln in logs.final.lines] == [(0, "one\n"), (1, "two")]
    assert logs.leftover == ""


def test_capture_logs_stores_the_rest_itself_when_the_step_is_interrupted() -> None:
    store = FakeStore()

    with (
        pytest.raises(KeyboardInterrupt),
        capture_logs(
            store.write, passthrough=False, flush_interval_s=None, final_with_commit=True
        ) as logs,
    ):
        print("last words")
        raise KeyboardInterrupt

    assert logs.final is None
    assert store.text() == "last words\n"


def test_log_buffer_drops_lines_trimmed_while_their_write_was_in_flight() -> None:
    buf = LogBuffer(max_chars=50, head_chars=10, max_line_chars=10)
    for i in range(5):
        buf.write("stdout", f"early {i}\n")  # 8 characters each; the first one is the head
    in_flight = buf.take()
    assert in_flight is not None and [ln.seq for ln in in_flight.lines] == [0, 1, 2, 3, 4]

    for i in range(5):
        buf.write("stdout", f"later {i}\n")  # pushes the in-flight tail lines out of the bound
    buf.give_back(in_flight)  # their write failed

    retry = buf.take()
    assert retry is not None
    assert [ln.text for ln in retry.lines] == ["early 0\n"] + [f"later {i}\n" for i in range(5)]
    assert retry.drop == (1, 5)  # the store may hold none of them, but deleting is harmless
