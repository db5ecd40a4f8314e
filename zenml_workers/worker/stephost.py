"""A solo (GPU) worker's step host: one spawned child process that runs its steps.

Celery's solo pool runs a task in the worker's own process, which can neither stop it
(it cannot even read a revoke while the task runs) nor free the GPU memory it holds. So the
solo worker's task hands each step to a child process and waits:

- the child is **spawned** (CUDA never crosses a fork), builds its own
  :class:`~zenml_workers.worker.context.WorkerContext` once and stays alive between steps,
  so imports and the CUDA context stay warm; it runs the unchanged ``execute_step`` (claim,
  inputs, outputs, commit and the lease keeper all happen there: its pid holds the lease)
  and sends back the follow-up tasks, which the worker sends;
- while a step runs, the worker reads its row every ``ZW_STOP_CHECK_INTERVAL_S`` and
  watches its ``timeout_s``; a cancelled, superseded or overdue step gets a soft stop
  (:mod:`zenml_workers.worker.stop`), and SIGKILL ``ZW_STOP_GRACE_S`` later, which frees its
  GPU memory; the worker then records what the child could not and spawns a replacement at
  once, so the next step does not pay the start-up;
- a child that dies on its own (an OOM kill) is replaced and the step is run again in the
  replacement, whose claim takes the dead attempt over (``execute.py`` ``_redelivered``:
  same node name, holder process gone), within the lost-worker tolerance.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for
from typing import Any

from scheduler.dispatch import QueuedStep
from scheduler.specs import StepTask
from stores.metadata.store import MetadataStore
from zenml_workers.settings import Settings
from zenml_workers.worker import stop
from zenml_workers.worker.outcome import Ended, how_it_ended

log = logging.getLogger("zenml_workers.worker")

#: How often a step may lose its child process in a row before the host gives up on it
#: (each loss is a lost worker: the lease policy fails the step before this).
MAX_LOSSES = 8
#: Seconds a closing host waits for its child to exit before killing it.
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Hosted:
    """What running a step in the host gave: the tasks to send and how its attempt ended, or
    (``raised``) the kind and message of an error that must reach the Celery task."""

    follow: list[QueuedStep] = field(default_factory=list)
    ended: Ended | None = None
    raised: tuple[str, str] | None = None


class StepHost:
    """The spawned child of one solo worker, and the loop that supervises its steps.

    Args:
        settings: the worker's settings (the child builds its stores from them).
        metadata: the worker process's metadata store (reads a running step's row, records
            a killed step's failure).
        log_level: the worker's log level, for the child's own log lines.
    """

    def __init__(
        self, settings: Settings, metadata: MetadataStore, *, log_level: int = logging.INFO
    ) -> None:
        self.settings = settings
        self.metadata = metadata
        self.log_level = log_level
        self._mp = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._box: stop.StopBox | None = None
        self.closing = False

    @property
    def pid(self) -> int | None:
        """The child's pid (None before it was started)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Spawn the child unless it runs (it imports and connects in the background)."""
        if self._proc is not None and self._proc.is_alive():
            return
        self._reap()
        parent, child = self._mp.Pipe(duplex=True)
        box = stop.StopBox(self._mp)
        proc = self._mp.Process(
            target=_host_main,
            args=(self.settings, child, box, self.log_level),
            name="zw-stephost",
            daemon=True,
        )
        proc.start()
        child.close()
        self._proc, self._conn, self._box = proc, parent, box
        log.info("step host process %d started", proc.pid)

    def run(
        self,
        task: StepTask,
        *,
        node: str,
        task_id: str | None,
        timeout_s: float | None,
        hand_back_due: Callable[[], bool] = lambda: False,
    ) -> Hosted:
        """Run one attempt of ``task`` in the child, stopping it when it is cancelled,
        superseded or past ``timeout_s``, or handing it back once ``hand_back_due()`` says
        the worker's shutdown grace is over; returns once the attempt is over.

        Raises:
            MetadataStoreError: the store could not be read while settling a killed step.
            ExecutionError: the step's child processes kept dying before the step could start.
        """
        for _ in range(MAX_LOSSES):
            self.start()
            hosted = self._run_once(
                task, node=node, task_id=task_id, timeout_s=timeout_s, hand_back_due=hand_back_due
            )
            if hosted is not None:
                return hosted
        from zenml_workers.errors import ExecutionError

        raise ExecutionError(
            f"run {task.run_id} step {task.invocation_id}: the step host lost {MAX_LOSSES} "
            "child processes in a row; check the worker's memory limits and its log"
        )

    def _run_once(
        self,
        task: StepTask,
        *,
        node: str,
        task_id: str | None,
        timeout_s: float | None,
        hand_back_due: Callable[[], bool],
    ) -> Hosted | None:
        proc, conn = self._proc, self._conn
        assert proc is not None and conn is not None and self._box is not None
        grace_s = self.settings.stop_grace_s
        interval_s = self.settings.stop_check_interval_s
        conn.send(("run", task, node, task_id, timeout_s))
        watch: stop.StepWatch | None = None
        next_check = time.monotonic() + interval_s
        while True:
            now = time.monotonic()
            wake = [next_check] if watch is not None else []
            if watch is not None and (due := watch.next_due(grace_s)) is not None:
                wake.append(due)
            timeout = max(0.0, min(wake) - now) if wake else interval_s
            ready = wait_for([conn, proc.sentinel], timeout)
            if conn in ready:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = None  # its end closed: it died; the sentinel says so next
                if msg is not None:
                    if msg[0] == "started":
                        watch = stop.StepWatch(
                            task.step_run_id,
                            task.invocation_id,
                            proc.pid,
                            started_at=time.monotonic(),
                            timeout_s=timeout_s,
                        )
                        continue
                    if msg[0] == "done":
                        return Hosted(follow=msg[1], ended=msg[2])
                    return Hosted(raised=(msg[1], msg[2]))
            if proc.sentinel in ready or not proc.is_alive():
                return self._after_death(task, watch, node=node, task_id=task_id)
            if watch is None:
                continue
            now = time.monotonic()
            if watch.kill_due(now, grace_s):
                log.warning(
                    "run %s step %s did not stop %.3g s after it was asked to (%s); killing "
                    "step host process %d",
                    task.run_id,
                    task.invocation_id,
                    grace_s,
                    watch.reason,
                    proc.pid,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=CLOSE_TIMEOUT_S)
                return self._after_death(task, watch, node=node, task_id=task_id)
            if watch.timed_out(now):
                self._ask(watch, stop.TIMEOUT, task)
            handing_back = watch.reason is None and hand_back_due()
            if now >= next_check or handing_back:
                next_check = now + interval_s
                try:
                    state = stop.watch_states(self.metadata, [watch]).get(task.step_run_id)
                    reason = watch.judge(state, node)
                    if reason is None and handing_back and self._hand_back(watch, node):
                        reason = stop.HANDED_BACK
                except Exception:  # the child may still finish; the next look retries
                    log.warning("could not read run %s step %s", task.run_id, task.invocation_id)
                    continue
                if reason is not None:
                    self._ask(watch, reason, task)

    def _hand_back(self, watch: stop.StepWatch, node: str) -> bool:
        """Put the child's attempt back on the queue (once it claimed it); whether it moved."""
        from stores.metadata import workers as w

        if watch.attempt is None:
            return False  # not claimed yet: the next look tries again
        with self.metadata.transaction() as s:
            return w.hand_back(
                s,
                watch.step_run_id,
                watch.attempt,
                host=node,
                pid=watch.pid,
                now=time.time(),
                reason=f"attempt {watch.attempt} handed back by {node}, which shut down",
            )

    def _ask(self, watch: stop.StepWatch, reason: str, task: StepTask) -> None:
        assert self._box is not None and self._proc is not None
        log.info(
            "run %s step %s: asking step host process %d to stop it (%s)",
            task.run_id,
            task.invocation_id,
            self._proc.pid,
            reason,
        )
        watch.reason, watch.asked_at = reason, time.monotonic()
        self._box.ask(reason, task.step_run_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, stop.SOFT_STOP)

    def _after_death(
        self, task: StepTask, watch: stop.StepWatch | None, *, node: str, task_id: str | None
    ) -> Hosted | None:
        """Settle a step whose child died; None means: run it again in a new child."""
        proc = self._proc
        proc.join(timeout=5)
        dead_pid, code = proc.pid, proc.exitcode
        self._reap()
        if not self.closing:
            self.start()  # the next step (or this one again) does not wait for the spawn
        reason = watch.reason if watch is not None else None
        follow: list[QueuedStep] = []
        if reason == stop.TIMEOUT:
            follow = stop.settle_attempt(
                self.metadata,
                self.settings,
                task,
                host=node,
                pid=dead_pid,
                error="StepTimeoutError: "
                + stop.timeout_message(
                    task.invocation_id,
                    watch.timeout_s if watch else None,
                    killed_after_s=self.settings.stop_grace_s,
                ),
            )
        elif reason is None:
            if self.closing:
                return Hosted(ended=self._ended(task, [], node, dead_pid, task_id))
            # An OOM kill or a crash: the replacement's claim takes the attempt over.
            log.warning(
                "run %s step %s: step host process %d died (exit code %s); running it again "
                "in a new one",
                task.run_id,
                task.invocation_id,
                dead_pid,
                code,
            )
            return None
        return Hosted(follow=follow, ended=self._ended(task, follow, node, dead_pid, task_id))

    def _ended(
        self, task: StepTask, follow: list[QueuedStep], node: str, pid: int, task_id: str | None
    ) -> Ended:
        return how_it_ended(self.metadata, task, follow, host=node, pid=pid, task_id=task_id)

    def _reap(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._proc = self._conn = self._box = None

    def close(self) -> None:
        """Ask the child to exit (killing it after a few seconds); the host can start again."""
        self.closing = True
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            conn.send(("exit",))
        proc.join(timeout=CLOSE_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=CLOSE_TIMEOUT_S)
        self._reap()


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the worker process dies, so no step outlives its worker."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _host_main(settings: Settings, conn: Any, box: stop.StopBox, log_level: int) -> None:
    """The child: build the worker context once, then run the steps the worker sends."""
    _die_with_parent()
    # The worker decides: a Ctrl-C or a SIGTERM to the whole process group (systemd) is its
    # warm shutdown, which lets this step finish or hands it back; it is not this step's end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
    )
    stops = stop.ChildStops(box).install()
    from stores.errors import InfrastructureError
    from zenml_workers.errors import StoreMismatchError, UntrustedInputError
    from zenml_workers.worker.context import WorkerContext
    from zenml_workers.worker.execute import execute_step

    ctx = WorkerContext.from_settings(settings)
    refusals = (
        (UntrustedInputError, "untrusted"),
        (StoreMismatchError, "store_mismatch"),
        (InfrastructureError, "infrastructure"),
    )
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        if msg[0] != "run":
            return
        _, task, node, task_id, timeout_s = msg
        ctx.host = node
        try:
            conn.send(("started",))
            ran = stop.run_stoppable(task, ctx, stops, timeout_s=timeout_s, execute=execute_step)
            ended = how_it_ended(
                ctx.metadata, task, ran.follow, host=node, pid=os.getpid(), task_id=task_id
            )
            conn.send(("done", ran.follow, ended))
        except BaseException as e:  # the worker boundary: recorded by execute_step if it could
            kind = next((k for cls, k in refusals if isinstance(e, cls)), "error")
            with contextlib.suppress(OSError):
                conn.send(("raised", kind, f"{type(e).__name__}: {e}"))
