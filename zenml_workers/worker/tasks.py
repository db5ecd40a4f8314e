"""The Celery task (thin: all the work is in :mod:`zenml_workers.worker.execute`) and worker hooks."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

from scheduler.specs import GPU_QUEUE, StepTask

if TYPE_CHECKING:
    from celery import Celery

    from zenml_workers.worker.context import WorkerContext

log = logging.getLogger("zenml_workers.worker")

_context: WorkerContext | None = None
_context_pid = 0


def worker_context(app: Celery) -> WorkerContext:
    """This process's stores and code cache, built on first use (after the prefork fork)."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        from zenml_workers.worker.context import WorkerContext

        _context = WorkerContext.from_settings(app.zw_settings)
        _context_pid = os.getpid()
    return _context


def register(app: Celery) -> None:
    from celery import signals
    from celery.exceptions import Reject

    from stores.errors import InfrastructureError
    from zenml_workers.errors import ConfigurationError, UntrustedInputError
    from zenml_workers.worker.celery_app import STEP_TASK, RunEvents, send_or_mark_unsent
    from zenml_workers.worker.signing import require_key

    events = RunEvents(app.zw_settings.reveal_broker_url(), app.zw_settings.broker_ssl_options())

    @app.task(
        name=STEP_TASK,
        bind=True,
        shared=False,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
    )
    def run_step(self: Any, task: dict[str, Any]) -> None:
        from zenml_workers.worker.execute import execute_step

        # Nothing of the message is used before its signature is checked.
        refusal = app.zw_signer.refusal(task)
        try:
            if refusal is not None:
                raise PermissionError(refusal)
            step_task = StepTask.decode(task)
        except (KeyError, TypeError, ValueError, PermissionError) as e:
            from zenml_workers.worker.broker import drop_step_task

            # Returning acks it: no redelivery can turn a malformed message into a step.
            drop_step_task(
                app.zw_settings.reveal_broker_url(),
                self.request,
                task,
                e,
                now=time.time(),
                reason=refusal,
                ssl_options=app.zw_settings.broker_ssl_options(),
            )
            return
        ctx = worker_context(app)
        if self.request.hostname:
            # The Celery node name (cpu@host, gpu@host) tells workers on one machine apart.
            ctx.host = self.request.hostname
        try:
            follow = execute_step(step_task, ctx)
        except UntrustedInputError as e:
            from zenml_workers.worker.broker import drop_step_task

            drop_step_task(
                app.zw_settings.reveal_broker_url(),
                self.request,
                task,
                e,
                now=time.time(),
                reason=str(e),
                ssl_options=app.zw_settings.broker_ssl_options(),
            )
            return
        except InfrastructureError as e:
            # The database stayed unreachable for the whole retry budget: give the message
            # back instead of acking it into oblivion; whoever takes it next takes over.
            raise Reject(str(e), requeue=True) from e
        if follow:
            send_or_mark_unsent(app, ctx.metadata, follow)
        else:
            # Only a step that queued nothing may have ended its run: wake the waiters.
            events.publish_idle(step_task.run_id, step=step_task.invocation_id)

    state: dict[str, Any] = {}

    @signals.celeryd_after_setup.connect(weak=False)
    def _after_setup(sender: str, instance: Any, **_: Any) -> None:
        if instance.app is not app:
            return
        # Before this worker consumes anything: leases recorded under its node name before
        # this moment belong to an earlier process of the same name, which is gone.
        state["booted_at"] = time.time()
        try:
            require_key(app.zw_settings, "worker")
        except ConfigurationError as e:
            raise UnsignedClusterError(str(e)) from e
        queues = sorted(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
        state["name"], state["queues"] = sender, queues
        if GPU_QUEUE in queues:
            check_gpu()

    @signals.worker_ready.connect(weak=False)
    def _ready(sender: Any, **_: Any) -> None:
        if sender.app is not app or "name" not in state:
            return
        beat = WorkerHeartbeat(app, state["name"], state["queues"], booted_at=state["booted_at"])
        state["heartbeat"] = beat
        beat.start()

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(sender: Any = None, **_: Any) -> None:
        beat = state.get("heartbeat")
        if beat is not None:
            beat.stop()


class UnsignedClusterError(SystemExit):
    """Raised at worker start-up when no signing key is configured (and ``ZW_INSECURE`` is not set)."""


class GPUUnavailableError(SystemExit):
    """Raised at worker start-up when a gpu-queue worker sees no GPU."""


def check_gpu() -> None:
    """Refuse to consume the gpu queue without a visible GPU, unless ``ZW_SKIP_GPU_CHECK=1``.

    Raises:
        GPUUnavailableError: neither ``nvidia-smi -L`` nor ``torch.cuda`` sees a GPU.
    """
    if os.environ.get("ZW_SKIP_GPU_CHECK", "").lower() in ("1", "true", "yes"):
        log.warning(
            "GPU check skipped (ZW_SKIP_GPU_CHECK); gpu steps will run on this machine's CPU"
        )
        return
    if gpu_count() > 0:
        return
    raise GPUUnavailableError(
        "this worker consumes the 'gpu' queue but sees no GPU (nvidia-smi and torch.cuda found none); "
        "run it on a GPU machine, or pass --skip-gpu-check (ZW_SKIP_GPU_CHECK=1) to run gpu steps on CPU"
    )


def gpu_count() -> int:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=20, check=False
            ).stdout
            n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
            if n:
                return n
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0


class WorkerHeartbeat:
    """Records this worker and its queues in SQL every ``heartbeat_interval_s``.

    Lets ``wait()`` tell users when their steps sit on a queue nobody consumes.
    """

    def __init__(self, app: Celery, name: str, queues: list[str], *, booted_at: float) -> None:
        self.app = app
        self.name = name
        self.queues = queues
        self.booted_at = booted_at
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zw-heartbeat", daemon=True)

    def start(self) -> None:
        from stores.metadata import workers as w

        try:
            with worker_context(self.app).metadata.transaction() as s:
                n = w.expire_leases_held_by(
                    s, [self.name], time.time(), started_before=self.booted_at
                )
            if n:
                log.warning(
                    "worker %s restarted: expired %d lease(s) of its previous process", self.name, n
                )
            self._beat()
        except Exception:  # the loop retries; recovery still has the worker TTL
            log.warning("worker %s could not write its first heartbeat", self.name, exc_info=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            from stores.metadata import workers as w

            with worker_context(self.app).metadata.transaction() as s:
                w.worker_stopped(s, self.name)
        except Exception:
            log.warning("could not mark worker %s stopped", self.name, exc_info=True)

    def _beat(self) -> None:
        from stores.metadata import workers as w
        from zenml_workers.worker.context import child_pids

        # This runs in the worker's main process, which outlives its pool children: a claim
        # under this node by a process that is neither it nor a live child is orphaned.
        seen_at = time.time()
        alive = {os.getpid(), *child_pids(os.getpid())}
        with worker_context(self.app).metadata.transaction() as s:
            w.worker_heartbeat(
                s,
                name=self.name,
                queues=self.queues,
                host=socket.gethostname(),
                pid=os.getpid(),
                now=seen_at,
            )
            n = w.expire_orphaned_leases(s, self.name, alive=alive, seen_at=seen_at)
        if n:
            log.warning(
                "worker %s: %d step(s) held by pool processes that died; handed back", self.name, n
            )

    def _loop(self) -> None:
        interval = self.app.zw_settings.heartbeat_interval_s
        while not self._stop.wait(interval):
            try:
                self._beat()
            except Exception:
                log.warning("worker heartbeat failed", exc_info=True)
