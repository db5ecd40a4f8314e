"""The embedded default's worker processes: a shared task queue, no broker.

Children pull step tasks from one queue and, when a step's commit queues
follow-up steps, put them straight back on that queue themselves; the parent
only counts how many tasks each run still has in flight. No parent round trip
sits between a step and its successors. A lone follow-up (a chain) runs in the
same child at once. Children run :func:`~zenml_workers.worker.execute.execute_step`,
the same code the Celery workers run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_for
from typing import Any

from scheduler.dispatch import QueuedStep
from scheduler.specs import StepTask
from zenml_workers.settings import Settings

log = logging.getLogger("zenml_workers.local")


def _child_main(settings: Settings, tasks: Any, results: Any) -> None:
    """Loop of one worker process: run tasks until the ``None`` sentinel."""
    from zenml_workers.worker.context import WorkerContext
    from zenml_workers.worker.execute import execute_step

    ctx = WorkerContext.from_settings(settings)
    while True:
        item = tasks.get()
        if item is None:
            return
        run_id, task, delay_s = item
        try:
            if delay_s > 0:  # a retry backing off
                time.sleep(delay_s)
            follow = execute_step(StepTask.decode(task), ctx)
            # A lone follow-up (a chain) runs right here; several go back on the queue
            # so that every process can take one.
            while len(follow) == 1:
                if follow[0].delay_s > 0:
                    time.sleep(follow[0].delay_s)
                follow = execute_step(follow[0].task, ctx)
        except (
            BaseException
        ) as e:  # recorded by execute_step where it could be; the run cannot go on
            results.put(("error", run_id, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            if not isinstance(e, Exception):
                raise
            continue
        # Report before enqueueing: the parent must count the new tasks before any can finish.
        results.put(("done", run_id, len(follow)))
        for f in follow:
            tasks.put((run_id, f.task.encode(), f.delay_s))


class RunTracker:
    """Counts a run's tasks in the pool; ``done`` is set when none is left."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.outstanding = 0
        self.error: str | None = None
        self.done = threading.Event()


class LocalPool:
    """Worker processes shared by every run this process submits, started on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pid = 0
        self._procs: list[Any] = []
        self._tasks: Any = None
        self._results: Any = None
        self._reader: threading.Thread | None = None
        self._trackers: dict[str, RunTracker] = {}

    def _start(self) -> None:
        if self._procs and self._pid == os.getpid() and all(p.is_alive() for p in self._procs):
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx: Any = multiprocessing.get_context(method)
        self._tasks, self._results = ctx.SimpleQueue(), ctx.SimpleQueue()
        # The object itself (inherited by fork, pickled by spawn): a JSON dump masks secrets.
        payload = self.settings
        self._procs = [
            ctx.Process(
                target=_child_main,
                args=(payload, self._tasks, self._results),
                daemon=True,
                name=f"zw-local-{i}",
            )
            for i in range(self.settings.local_worker_count())
        ]
        for p in self._procs:
            p.start()
        self._pid = os.getpid()
        self._reader = threading.Thread(
            target=self._read_results,
            args=(self._results, list(self._procs)),
            name="zw-local-results",
            daemon=True,
        )
        self._reader.start()

    def send(self, queued: list[QueuedStep], tracker: RunTracker) -> None:
        """Start the given steps of ``tracker``'s run; their follow-ups are sent by the children."""
        with self._lock:
            self._trackers[tracker.run_id] = tracker
            if not queued:
                if tracker.outstanding == 0:
                    tracker.done.set()
                return
            self._start()
            tracker.outstanding += len(queued)
            tasks = self._tasks
        for q in queued:
            tasks.put((tracker.run_id, q.task.encode(), q.delay_s))

    def _read_results(self, results: Any, procs: list[Any]) -> None:
        sentinels = [p.sentinel for p in procs]
        reader = results._reader
        while True:
            ready = wait_for([reader, *sentinels])
            if reader in ready:
                kind, run_id, value = results.get()
                self._account(kind, run_id, value)
                continue
            # A child died (killed, segfault): runs in flight here cannot finish.
            dead = [p for p in procs if p.sentinel in ready]
            with self._lock:
                trackers = list(self._trackers.values())
                if self._procs is procs:
                    self._procs = []
            for tracker in trackers:
                if tracker.outstanding > 0:
                    tracker.error = (
                        f"local worker process {dead[0].pid} died (exit code {dead[0].exitcode})"
                    )
                    tracker.done.set()
            for p in procs:
                if p.is_alive():
                    p.kill()
            return

    def _account(self, kind: str, run_id: str, value: Any) -> None:
        with self._lock:
            tracker = self._trackers.get(run_id)
            if tracker is None:
                return
            if kind == "error":
                tracker.error = tracker.error or value
                tracker.outstanding -= 1
            else:
                tracker.outstanding += int(value) - 1
            if tracker.outstanding <= 0:
                tracker.done.set()

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._trackers.pop(run_id, None)

    def shutdown(self) -> None:
        with self._lock:
            procs, self._procs = self._procs, []
            tasks = self._tasks
        if not procs or self._pid != os.getpid():
            return
        for _ in procs:
            tasks.put(None)
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
