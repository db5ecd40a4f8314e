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
    from zenml_workers.errors import (
        ConfigurationError,
        StepFailedError,
        StoreMismatchError,
        UntrustedInputError,
    )
    from zenml_workers.worker.attempt import AttemptRunner, end_task
    from zenml_workers.worker.celery_app import STEP_TASK, RunEvents, send_or_mark_unsent
    from zenml_workers.worker.signing import require_key

    events = RunEvents(app.zw_settings.reveal_broker_url(), app.zw_settings.broker_ssl_options())
    #: Where this worker runs attempts (the solo worker's step host) and how it stops them.
    runner = AttemptRunner(app)

    @app.task(
        name=STEP_TASK,
        bind=True,
        shared=False,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        # A failed step's task ends in FAILURE (Flower shows the step's exception) and its
        # message is acked, not redelivered: the retry, if any, is a new task already sent.
        # (Celery before 5.7 reads only the first of these; 5.7 deprecates it for the others.)
        acks_on_failure_or_timeout=True,
        acks_on_failure=True,
        acks_on_timeout=True,
        throws=(StepFailedError,),
    )
    def run_step(self: Any, task: dict[str, Any]) -> None:
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
            attempt = runner.run(self.request, step_task, ctx)
        except (UntrustedInputError, StoreMismatchError) as e:
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
            if isinstance(e, StoreMismatchError):
                # Its client waits on the same broker: tell it, instead of "no live worker".
                # The step stays queued in its own store, whose scheduler resends it.
                events.publish_refused(step_task.run_id, step=step_task.invocation_id, why=str(e))
            return
        except InfrastructureError as e:
            # The database stayed unreachable for the whole retry budget: give the message
            # back instead of acking it into oblivion; whoever takes it next takes over.
            raise Reject(str(e), requeue=True) from e
        if attempt.follow:
            send_or_mark_unsent(app, ctx.metadata, attempt.follow)
        else:
            # Only a step that queued nothing may have ended its run: wake the waiters.
            events.publish_idle(step_task.run_id, step=step_task.invocation_id)
        end_task(self, step_task, attempt.ended)

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
        state["concurrency"] = pool_concurrency(instance)
        if GPU_QUEUE in queues:
            check_gpu()
        state["solo"] = is_solo(instance)
        runner.configure(solo=state["solo"], log_level=_log_level(instance))

    @signals.worker_ready.connect(weak=False)
    def _ready(sender: Any, **_: Any) -> None:
        if sender.app is not app or "name" not in state:
            return
        beat = WorkerHeartbeat(
            app,
            state["name"],
            state["queues"],
            booted_at=state["booted_at"],
            concurrency=state["concurrency"],
        )
        state["heartbeat"] = beat
        beat.start()
        runner.start()

    @signals.worker_shutting_down.connect(weak=False)
    def _shutting_down(sender: Any = None, how: str = "Warm", **_: Any) -> None:
        # Inside the signal handler: only note it (ShutdownGrace starts or wakes a thread).
        if "name" not in state or sender != state["name"]:
            return
        if runner.grace is None:
            from zenml_workers.worker.shutdown import ShutdownGrace

            runner.grace = ShutdownGrace(
                worker_context(app).metadata,
                app.zw_settings,
                state["name"],
                sweep=not state.get("solo", False),
            )
        runner.grace.signalled(how)

    @signals.task_failure.connect(weak=False)
    def _hard_time_limit(
        sender: Any = None, exception: BaseException | None = None, kwargs: Any = None, **_: Any
    ) -> None:
        from celery.exceptions import TimeLimitExceeded

        if getattr(sender, "name", None) != STEP_TASK or not isinstance(
            exception, TimeLimitExceeded
        ):
            return
        # Celery killed the pool child at the step's hard time limit; this is the main process.
        message = (kwargs or {}).get("task")
        if not isinstance(message, dict) or "name" not in state:
            return
        if app.zw_signer.refusal(message) is not None:
            return
        ctx = worker_context(app)
        ctx.host = state["name"]
        step_task = StepTask.decode(message)
        limit_s = float(exception.args[0]) if exception.args else 0.0
        try:
            follow = runner.record_hard_timeout(step_task, ctx, limit_s)
        except Exception:  # its lease runs out and the scheduler recovers it
            log.warning("could not record the hard time limit of %s", step_task, exc_info=True)
            return
        if follow:
            send_or_mark_unsent(app, ctx.metadata, follow)
        else:
            events.publish_idle(step_task.run_id, step=step_task.invocation_id)

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(sender: Any = None, **_: Any) -> None:
        runner.close()
        beat = state.get("heartbeat")
        if beat is not None:
            beat.stop()


def is_solo(worker: Any) -> bool:
    """Whether a Celery worker (its ``WorkController``) runs tasks in its own process (solo)."""
    pool = getattr(worker, "pool_cls", None)
    return "solo" in str(pool if isinstance(pool, str) else getattr(pool, "__module__", ""))


def _log_level(worker: Any) -> int:
    level = getattr(worker, "loglevel", logging.INFO)
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    return level if isinstance(level, int) else logging.INFO


def pool_concurrency(worker: Any) -> int:
    """How many steps a Celery worker (its ``WorkController``) runs at once: 1 for the solo
    pool, else its ``--concurrency``; 0 when it cannot tell."""
    pool = getattr(worker, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "solo" in str(name):
        return 1
    try:
        return max(0, int(getattr(worker, "concurrency", 0) or 0))
    except (TypeError, ValueError):
        return 0


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

    def __init__(
        self,
        app: Celery,
        name: str,
        queues: list[str],
        *,
        booted_at: float,
        concurrency: int = 0,
    ) -> None:
        self.app = app
        self.name = name
        self.queues = queues
        self.booted_at = booted_at
        #: Steps the pool runs at once, recorded for autoscaling (``zw queues``); 0: unknown.
        self.concurrency = concurrency
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
                concurrency=self.concurrency,
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
