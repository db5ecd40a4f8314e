"""The embedded default's worker processes, and the thread that supervises them.

Each process has its own pipe to a supervisor thread in the submitting process, which hands
every idle process the next task. A process whose step's commit queued follow-up steps runs
a lone one (a chain) itself at once and reports the rest, which the supervisor hands on;
the parent only counts how many tasks each run still has in flight. Children run
:func:`~zenml_workers.worker.execute.execute_step`, the same code the Celery workers run.

While a step runs, the supervisor watches it (:mod:`zenml_workers.worker.stop`): it reads the
step's row every ``ZW_STOP_CHECK_INTERVAL_S`` (at once after a cancel from this process), and
a cancelled step, or one past its ``timeout_s``, gets a soft stop, then SIGKILL
``ZW_STOP_GRACE_S`` later. A process that dies (killed that way, OOM-killed, crashed) is
replaced at once, and its step is recorded, failed (``StepTimeoutError``, or
``WorkerLostError`` for a death of its own) unless it was cancelled; the other runs go on.
One pipe per process means a process killed mid-message can only garble its own.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from typing import Any

from scheduler.dispatch import QueuedStep
from scheduler.specs import StepTask
from stores.metadata.store import MetadataStore
from zenml_workers.settings import Settings
from zenml_workers.worker import stop

log = logging.getLogger("zenml_workers.local")

#: A task handed to a process: (run id, encoded step task, seconds to wait before it starts).
Item = tuple[str, dict[str, Any], float]


def _child_main(settings: Settings, conn: Any, box: stop.StopBox, inherited: list[Any]) -> None:
    """Loop of one worker process: run the tasks the supervisor sends until ``None``.

    ``inherited`` are the parent's pipe ends a fork copied here: closed, so that this
    process sees its pipe end (and exits) when the parent dies.
    """
    from zenml_workers.worker.context import WorkerContext

    for end in inherited:
        with contextlib.suppress(OSError):
            end.close()

    ctx = WorkerContext.from_settings(settings)
    stops = stop.ChildStops(box).install()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the submitting process is gone
        if msg is None:
            return
        _, run_id, encoded, delay_s = msg
        follow: list[QueuedStep] = []
        error = None
        try:
            follow = _run_one(ctx, stops, conn, StepTask.decode(encoded), delay_s)
            # A lone follow-up (a chain) runs right here; several go back to the supervisor
            # so that every process can take one.
            while len(follow) == 1:
                follow = _run_one(ctx, stops, conn, follow[0].task, follow[0].delay_s)
        except BaseException as e:  # recorded by execute_step where it could; the run stops
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            follow = []
            if not isinstance(e, Exception):
                conn.send(("done", run_id, [], error))
                raise
        conn.send(("done", run_id, [(run_id, f.task.encode(), f.delay_s) for f in follow], error))


def _run_one(
    ctx: Any, stops: stop.ChildStops, conn: Any, task: StepTask, delay_s: float
) -> list[QueuedStep]:
    from zenml_workers.worker.execute import execute_step

    timeout_s = stop.step_timeout(task, ctx)
    conn.send(("started", task.encode(), timeout_s, delay_s))
    if delay_s > 0:  # a retry backing off
        time.sleep(delay_s)
    return stop.run_stoppable(task, ctx, stops, timeout_s=timeout_s, execute=execute_step).follow


class RunTracker:
    """Counts a run's tasks in the pool; ``done`` is set when none is left."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.outstanding = 0
        self.error: str | None = None
        self.done = threading.Event()


@dataclass
class _Slot:
    """One worker process, its pipe and stop box, and the task and step it runs now."""

    index: int
    process: Any
    conn: Any
    box: stop.StopBox
    item: Item | None = None
    task: StepTask | None = None
    watch: stop.StepWatch | None = None
    killed: bool = False


class LocalPool:
    """Worker processes shared by every run this process submits, started on first use.

    Args:
        settings: the stack's settings (the children build their stores from them).
        metadata: the stack's metadata store, for watching running steps and recording
            what a dead process could not (built from ``settings`` when not given).
    """

    def __init__(self, settings: Settings, metadata: MetadataStore | None = None) -> None:
        self.settings = settings
        self._metadata = metadata
        self._host = socket.gethostname()  # the children's WorkerContext default
        self._lock = threading.Lock()
        self._pid = 0
        self._mp: Any = None
        self._slots: list[_Slot] = []
        self._pending: deque[Item] = deque()
        self._trackers: dict[str, RunTracker] = {}
        self._wake_r: Any = None
        self._wake_w: Any = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._quiet_at_exit = False
        self._look_now = False

    @property
    def metadata(self) -> MetadataStore:
        if self._metadata is None:
            s = self.settings
            self._metadata = MetadataStore(
                s.resolved_metadata_url(), connect_args=s.metadata_connect_args()
            )
        return self._metadata

    # -- the submitting side ------------------------------------------------------------------

    def _start(self) -> None:
        """Start the processes and the supervisor (under ``_lock``), unless they run."""
        if self._slots and self._pid == os.getpid():
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self._mp = multiprocessing.get_context(method)
        self._wake_r, self._wake_w = self._mp.Pipe(duplex=False)
        self._pending.clear()
        self._closing = False
        self._slots = [self._spawn(i) for i in range(self.settings.local_worker_count())]
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._supervise, name="zw-local-pool", daemon=True)
        self._thread.start()
        if not self._quiet_at_exit:
            # atexit runs newest first: this runs before multiprocessing terminates the
            # (daemonic) processes, so their ends at interpreter exit are not reported as deaths.
            atexit.register(self._closing_at_exit)
            self._quiet_at_exit = True

    def _closing_at_exit(self) -> None:
        with self._lock:
            self._closing = True

    def _spawn(self, index: int) -> _Slot:
        parent, child = self._mp.Pipe(duplex=True)
        box = stop.StopBox(self._mp)
        inherited = []
        if self._mp.get_start_method() == "fork":
            inherited = [parent, self._wake_r, self._wake_w, *(s.conn for s in self._slots)]
        # The settings object itself (inherited by fork, pickled by spawn): a dump masks secrets.
        proc = self._mp.Process(
            target=_child_main,
            args=(self.settings, child, box, inherited),
            daemon=True,
            name=f"zw-local-{index}",
        )
        proc.start()
        child.close()
        return _Slot(index, proc, parent, box)

    def send(self, queued: list[QueuedStep], tracker: RunTracker) -> None:
        """Start the given steps of ``tracker``'s run; their follow-ups are sent by the pool."""
        with self._lock:
            self._trackers[tracker.run_id] = tracker
            if not queued:
                if tracker.outstanding == 0:
                    tracker.done.set()
                return
            self._start()
            tracker.outstanding += len(queued)
            self._pending.extend((tracker.run_id, q.task.encode(), q.delay_s) for q in queued)
        self._wake()

    def look_now(self) -> None:
        """Read the running steps' rows at once (this process just cancelled a run)."""
        with self._lock:
            self._look_now = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self._wake_w.send_bytes(b"w")

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._trackers.pop(run_id, None)

    def shutdown(self) -> None:
        with self._lock:
            slots, self._slots = self._slots, []
            self._closing = True
            thread = self._thread
        if not slots or self._pid != os.getpid():
            return
        self._wake()
        if thread is not None:
            thread.join(timeout=5)
        for slot in slots:
            with contextlib.suppress(OSError, ValueError):
                slot.conn.send(None)
        for slot in slots:
            slot.process.join(timeout=10)
            if slot.process.is_alive():
                slot.process.kill()
            with contextlib.suppress(OSError):
                slot.conn.close()

    # -- the supervisor thread ----------------------------------------------------------------

    def _supervise(self) -> None:
        next_look = 0.0
        while True:
            with self._lock:
                if self._closing:
                    return
                self._hand_out()
                slots = list(self._slots)
            try:
                next_look = self._step(slots, next_look)
            except Exception:  # one bad turn must not stop the pool; the next one retries
                log.warning("the local pool's supervisor hit an error", exc_info=True)
                time.sleep(self.settings.stop_check_interval_s)

    def _hand_out(self) -> None:
        """Give each idle, live process the next pending task (under ``_lock``)."""
        for slot in self._slots:
            if not self._pending:
                return
            if slot.item is None and not slot.killed and slot.process.is_alive():
                item = self._pending.popleft()
                try:
                    slot.conn.send(("run", *item))
                except OSError:
                    self._pending.appendleft(item)  # it died; its sentinel says so next
                    continue
                slot.item = item

    def _step(self, slots: list[_Slot], next_look: float) -> float:
        """One turn: wait for a message, a death, a wake-up or the next look; act on it."""
        grace_s = self.settings.stop_grace_s
        interval_s = self.settings.stop_check_interval_s
        watched = [s for s in slots if s.watch is not None]
        wake = [next_look] if watched else []
        for s in watched:
            assert s.watch is not None
            if not s.killed and (due := s.watch.next_due(grace_s)) is not None:
                wake.append(due)
        timeout = max(0.0, min(wake) - time.monotonic()) if wake else None
        handles = [self._wake_r, *(s.conn for s in slots), *(s.process.sentinel for s in slots)]
        ready = wait_for(handles, timeout)
        if self._wake_r in ready:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
        for slot in slots:
            if slot.conn in ready:
                self._receive(slot)
        for slot in slots:
            if slot.process.sentinel in ready:
                self._replace(slot)
        with self._lock:
            look_now, self._look_now = self._look_now, False
            watched = [s for s in self._slots if s.watch is not None and not s.killed]
        now = time.monotonic()
        if watched and (look_now or now >= next_look):
            next_look = now + interval_s
            states = stop.watch_states(self.metadata, [s.watch for s in watched if s.watch])
            for slot in watched:
                assert slot.watch is not None
                reason = slot.watch.judge(states.get(slot.watch.step_run_id), self._host)
                if reason is not None:
                    self._ask(slot, reason)
        for slot in watched:
            assert slot.watch is not None
            if slot.watch.kill_due(now, grace_s):
                log.warning(
                    "run %s step %s did not stop %.3g s after it was asked to (%s); killing "
                    "local worker process %d",
                    slot.item[0] if slot.item else "?",
                    slot.watch.invocation_id,
                    grace_s,
                    slot.watch.reason,
                    slot.process.pid,
                )
                slot.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGKILL)
            elif slot.watch.timed_out(now):
                self._ask(slot, stop.TIMEOUT)
        return next_look

    def _ask(self, slot: _Slot, reason: str) -> None:
        watch = slot.watch
        assert watch is not None
        watch.reason, watch.asked_at = reason, time.monotonic()
        slot.box.ask(reason, watch.step_run_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.process.pid, stop.SOFT_STOP)

    def _receive(self, slot: _Slot) -> None:
        try:
            msg = slot.conn.recv()
        except Exception:  # EOF or a message cut short by its death: the sentinel follows
            if slot.process.is_alive():
                slot.killed = True
                slot.process.kill()
            return
        if msg[0] == "started":
            _, encoded, timeout_s, delay_s = msg
            slot.task = StepTask.decode(encoded)
            slot.watch = stop.StepWatch(
                slot.task.step_run_id,
                slot.task.invocation_id,
                slot.process.pid,
                started_at=time.monotonic() + delay_s,
                timeout_s=timeout_s,
            )
            return
        _, run_id, follow, error = msg
        slot.item, slot.task, slot.watch = None, None, None
        self._finish(run_id, follow, error)

    def _finish(self, run_id: str, follow: list[Item], error: str | None) -> None:
        """Account a finished task of ``run_id`` and queue its follow-ups."""
        with self._lock:
            self._pending.extend(follow)
            tracker = self._trackers.get(run_id)
            if tracker is None:
                return
            if error is not None:
                tracker.error = tracker.error or error
            tracker.outstanding += len(follow) - 1
            if tracker.outstanding <= 0:
                tracker.done.set()

    def _replace(self, slot: _Slot) -> None:
        """A process died: start its replacement, then settle what it was running."""
        slot.process.join(timeout=5)
        pid, code = slot.process.pid, slot.process.exitcode
        with contextlib.suppress(OSError):
            slot.conn.close()
        with self._lock:
            if self._closing:
                return
            fresh = self._spawn(slot.index)
            self._slots = [fresh if s is slot else s for s in self._slots]
        item, task, watch = slot.item, slot.task, slot.watch
        if item is None:
            log.warning("local worker process %d died (exit code %s) while idle", pid, code)
            return
        if task is None or watch is None:
            with self._lock:
                self._pending.appendleft(item)  # it died before it started: hand it out again
            return
        reason = watch.reason
        retry_allowed = True
        if reason == stop.TIMEOUT:
            error = "StepTimeoutError: " + stop.timeout_message(
                task.invocation_id, watch.timeout_s, killed_after_s=self.settings.stop_grace_s
            )
        elif reason is None:
            error = f"WorkerLostError: local worker process {pid} died (exit code {code})"
            retry_allowed = False  # whatever killed it would most likely kill it again
            log.warning("run %s step %s: %s", task.run_id, task.invocation_id, error)
        else:
            error = f"StepStopped: local worker process {pid} was killed ({reason})"
        follow = stop.settle_attempt(
            self.metadata,
            self.settings,
            task,
            host=self._host,
            pid=pid,
            error=error,
            retry_allowed=retry_allowed,
            resend_unclaimed=True,
        )
        self._finish(item[0], [(item[0], f.task.encode(), f.delay_s) for f in follow], None)
