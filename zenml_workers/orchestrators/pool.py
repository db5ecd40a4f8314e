"""The embedded default: a pool of local worker processes, no broker.

The submitting process plans the run in SQL, hands ready steps to the pool and,
as each step finishes, sends the follow-up tasks that step's own commit queued.
Children run :func:`~zenml_workers.worker.execute.execute_step`, the same code
the Celery workers run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from scheduler.dispatch import QueuedStep
from zenml_workers.settings import Settings
from zenml_workers.specs import StepTask

log = logging.getLogger("zenml_workers.local")

_CHILD: Any = None  # the WorkerContext of a pool child, built by its initializer


def _init_child(settings_json: str) -> None:
    global _CHILD
    from zenml_workers.worker.execute import WorkerContext

    settings = Settings.model_validate_json(settings_json)
    _CHILD = WorkerContext.from_settings(settings, name=f"local-{os.getpid()}")


def _run_in_child(task: dict[str, Any]) -> list[tuple[dict[str, Any], str, str, str]]:
    from zenml_workers.worker.execute import execute_step

    follow = execute_step(StepTask.decode(task), _CHILD)
    return [(f.task.encode(), f.queue, f.task_id, f.step_name) for f in follow]


class RunTracker:
    """Counts a run's steps in the pool; ``done`` is set when none is left."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.outstanding = 0
        self.finished_steps = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.changed = threading.Condition()


class LocalPool:
    """A lazily started process pool shared by every run this process submits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                self._pool = ProcessPoolExecutor(
                    max_workers=self.settings.local_worker_count(),
                    mp_context=multiprocessing.get_context(method),
                    initializer=_init_child,
                    initargs=(self.settings.model_dump_json(),),
                )
                self._pid = os.getpid()
            return self._pool

    def send(self, queued: list[QueuedStep], tracker: RunTracker) -> None:
        """Start the given steps; their follow-ups are sent as they finish."""
        if not queued:
            with tracker.changed:
                if tracker.outstanding == 0:
                    tracker.done.set()
            return
        pool = self._executor()
        with tracker.changed:
            tracker.outstanding += len(queued)
        for q in queued:
            try:
                fut = pool.submit(_run_in_child, q.task.encode())
            except RuntimeError as e:  # pool shut down or broken
                self._finish(tracker, [], e)
                continue
            fut.add_done_callback(lambda f, t=tracker: self._on_done(f, t))

    def _on_done(self, fut: Future[Any], tracker: RunTracker) -> None:
        try:
            follow = [
                QueuedStep(task=StepTask.decode(t), queue=qn, task_id=tid, step_name=name)
                for t, qn, tid, name in fut.result()
            ]
        except BaseException as e:  # a child died (BrokenProcessPool): the run cannot go on here
            log.error("run %s: local worker process failed: %s", tracker.run_id, e)
            with self._lock:
                self._pool = None
            self._finish(tracker, [], e)
            return
        self._finish(tracker, follow, None)

    def _finish(self, tracker: RunTracker, follow: list[QueuedStep], error: BaseException | None) -> None:
        if follow:
            self.send(follow, tracker)
        with tracker.changed:
            tracker.outstanding -= 1
            tracker.finished_steps += 1
            if error is not None and tracker.error is None:
                tracker.error = error
            if tracker.outstanding <= 0:
                tracker.done.set()
            tracker.changed.notify_all()

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
