"""A worker's warm shutdown with a deadline: finish what fits, hand the rest back.

Celery's warm shutdown (SIGTERM) stops consuming and waits for running tasks however long
they take, and a preempted VM or a rolling deploy does not wait that long: the kill then
costs each running step an attempt and a lease timeout. :class:`ShutdownGrace` lets running
steps finish for ``ZW_SHUTDOWN_GRACE_S``; then, or at once on a second signal (or a cold
shutdown), it **hands back** each step still running in one of the worker's child
processes (prefork children, the solo worker's step host): one guarded move puts the row
back to ``queued`` without costing an attempt (``stores.metadata.workers.hand_back``), and
the child gets :data:`~zenml_workers.worker.stop.HAND_BACK`, which raises inside the step;
its task then rejects its message with ``requeue`` so another worker takes it. A child that
does not stop within ``ZW_STOP_GRACE_S`` is killed (Celery requeues a killed child's message
too). A step that runs in the worker's own process (a solo worker without its step host)
cannot be handed back and is waited for, as Celery does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

from stores.metadata import workers as w
from stores.metadata.store import MetadataStore
from zenml_workers.settings import Settings
from zenml_workers.worker.context import child_pids, pid_alive
from zenml_workers.worker.stop import HAND_BACK

log = logging.getLogger("zenml_workers.worker")

#: Seconds between looks for steps still held by this worker's children after the grace.
SWEEP_INTERVAL_S = 0.25


class ShutdownGrace:
    """Counts a worker's shutdown signals and hands its running steps back when due.

    Args:
        metadata: the worker process's metadata store.
        settings: ``shutdown_grace_s`` and ``stop_grace_s``.
        node: the worker's Celery node name (the ``worker_host`` of its steps' rows).
    """

    def __init__(
        self, metadata: MetadataStore, settings: Settings, node: str, *, sweep: bool
    ) -> None:
        self.metadata = metadata
        self.settings = settings
        self.node = node
        #: Hand back from a thread (prefork: the steps run in pool children); a solo worker's
        #: step host asks :meth:`due` instead, between its looks at the running step.
        self.sweeps = sweep
        self.signals = 0
        self._first_at: float | None = None
        self._now = threading.Event()
        self._thread: threading.Thread | None = None

    def signalled(self, how: str) -> None:
        """A shutdown signal arrived (``how``: Celery's ``Warm`` or ``Cold``). Runs inside the
        signal handler: it only notes the time, starts the thread or wakes it."""
        self.signals += 1
        if self._first_at is None:
            self._first_at = time.monotonic()
        if self.signals > 1 or how != "Warm":
            self._now.set()
        if self.sweeps and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="zw-shutdown", daemon=True)
            self._thread.start()

    def due(self) -> bool:
        """Whether running steps must be handed back now: the grace is over, or a second
        signal (or a cold shutdown) came."""
        if self._first_at is None:
            return False
        return self._now.is_set() or (
            time.monotonic() >= self._first_at + self.settings.shutdown_grace_s
        )

    def _run(self) -> None:
        if not self._now.wait(self.settings.shutdown_grace_s):
            log.info(
                "worker %s: shutdown grace of %.3g s is over; handing back its running steps",
                self.node,
                self.settings.shutdown_grace_s,
            )
        else:
            log.info("worker %s: second shutdown signal; handing back its running steps", self.node)
        asked: dict[int, float] = {}  # child pid -> when it was asked to stop
        while True:
            try:
                self.sweep(asked, now=time.monotonic())
            except Exception:  # the database may be down: the lease and the scheduler remain
                log.warning("worker %s: could not hand back its steps", self.node, exc_info=True)
            time.sleep(SWEEP_INTERVAL_S)

    def sweep(self, asked: dict[int, float], *, now: float) -> int:
        """Hand back the steps the worker's children hold; kill children that were asked
        ``stop_grace_s`` ago and still hold one. Returns how many were handed back."""
        children = sorted(child_pids(os.getpid()))
        moved = []
        with self.metadata.transaction() as s:
            held = w.running_on(s, self.node, children)
            for row in held:
                assert row.worker_pid is not None
                if w.hand_back(
                    s,
                    row.id,
                    row.attempt,
                    host=self.node,
                    pid=row.worker_pid,
                    now=time.time(),
                    reason=f"attempt {row.attempt} handed back by {self.node}, which shut down",
                ):
                    moved.append(row)
        for row in moved:
            assert row.worker_pid is not None
            asked.setdefault(row.worker_pid, now)
            log.warning(
                "worker %s: step run %s (attempt %d) handed back; stopping process %d",
                self.node,
                row.id,
                row.attempt,
                row.worker_pid,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(row.worker_pid, HAND_BACK)
        for pid, at in list(asked.items()):
            if not pid_alive(pid):
                del asked[pid]
            elif now >= at + self.settings.stop_grace_s and _runs_a_task(pid):
                log.warning(
                    "worker %s: process %d did not stop within %.3g s; killing it",
                    self.node,
                    pid,
                    self.settings.stop_grace_s,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                del asked[pid]
        return len(moved)


def _runs_a_task(pid: int) -> bool:
    """Whether pool process ``pid`` still runs a task (warm shutdown gives it no new one, so
    this is the step it was asked to stop)."""
    from celery.worker import state

    return any(getattr(r, "worker_pid", None) == pid for r in list(state.active_requests))
