"""The Celery app: safe delivery settings, step-task sending and run events.

Operators start workers the usual way (``celery -A zenml_workers.worker worker
-Q cpu``) or with ``zw worker``. A worker needs only the broker URL, the
metadata store URL and artifact store credentials.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from scheduler.dispatch import QueuedStep
from stores.metadata import queries as q
from stores.metadata.store import MetadataStore
from zenml_workers.settings import Settings
from zenml_workers.worker.signing import signer_for

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("zenml_workers.worker")

#: The one registered task; Flower shows each message under its ``shadow`` name ``pipeline.step``.
STEP_TASK = "zw.step"


def create_app(settings: Settings) -> Celery:
    """A Celery app configured for crash-safe step execution on ``settings.broker_url``.

    Late acks and reject-on-worker-lost make a killed worker's step come back;
    the SQL lease (not the broker) decides which attempt wins.
    """
    from celery import Celery

    from zenml_workers.worker.broker import celery_config, tls_transport_options
    from zenml_workers.worker.connection import AMQP_CLASS

    # AMQP_CLASS: the banner, logs and Flower show no ":**" for a URL without a password.
    app = Celery(
        "zenml_workers",
        broker=settings.reveal_broker_url(),
        set_as_current=False,
        amqp=AMQP_CLASS,
    )
    app.conf.update(
        # A publish to a broker that is down gives up after ~1 s instead of blocking the
        # caller; the steps stay queued in SQL and the scheduler sends them later.
        broker_connection_timeout=2,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="cpu",
        task_create_missing_queues=True,
        worker_send_task_events=True,
        # Flower learns of a step when a worker receives it; "sent" events would add a
        # broker write to every step hand-off.
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        # A step's prints go to the worker's stdout as they are, once: Celery's redirect would
        # turn each into a "WARNING celery.redirected" record (the step's log capture keeps
        # such records out of the step's log either way, see worker/logcapture.py).
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": int(settings.visibility_timeout_s),
            **tls_transport_options(settings.reveal_broker_url(), settings.broker_ssl_options()),
        },
        # No step may outlive the visibility timeout (Redis would deliver it again). A global
        # limit also switches on the pool's time-limit handling that steps' timeout_s needs.
        task_time_limit=int(settings.visibility_timeout_s),
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Our Redis transport: a message that is not a valid envelope is dead-lettered
        # instead of stopping the worker (see zenml_workers.worker.broker).
        **celery_config(settings.reveal_broker_url(), settings.broker_ssl_options()),
    )
    # On the app object, not in app.conf: `celery inspect conf` and Flower show app.conf to
    # any broker client, and the settings hold credentials.
    app.zw_settings = settings  # type: ignore[attr-defined]
    app.zw_signer = signer_for(settings)  # type: ignore[attr-defined]
    from zenml_workers.worker import tasks

    tasks.register(app)
    return app


def send_steps(app: Celery, queued: Sequence[QueuedStep]) -> None:
    """Publish step tasks; each is named ``pipeline.invocation`` in Flower and shows its run id.

    Flower's task list shows (and searches, e.g. ``/api/tasks?search=<run id>``) a task's
    ``kwargsrepr``: the run id and the step, not the signed message.
    """
    if not queued:
        return
    grace_s = app.zw_settings.stop_grace_s  # type: ignore[attr-defined]
    with app.producer_or_acquire() as producer:
        for q in queued:
            limits: dict[str, float] = {}
            if q.timeout_s:
                # The step gets StepTimeoutError (recorded as its failure, retried if it has
                # retries); a step that ignores it is killed ZW_STOP_GRACE_S later. Prefork
                # workers enforce both through Celery; a solo worker's step host reads them.
                limits = {"soft_time_limit": q.timeout_s, "time_limit": q.timeout_s + grace_s}
            if q.delay_s > 0:
                limits["countdown"] = q.delay_s
            app.send_task(
                STEP_TASK,
                kwargs={"task": app.zw_signer.sign(q.task.encode())},
                kwargsrepr=repr({"run_id": q.task.run_id, "step": q.task.invocation_id}),
                queue=q.queue,
                routing_key=q.queue,
                task_id=q.task_id,
                shadow=f"{q.task.pipeline}.{q.task.invocation_id}",
                producer=producer,
                **limits,
            )


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a publish raises when the broker cannot be reached."""
    import kombu.exceptions
    import redis

    return (kombu.exceptions.OperationalError, redis.RedisError, OSError)


def send_or_mark_unsent(app: Celery, metadata: MetadataStore, queued: Sequence[QueuedStep]) -> bool:
    """Publish step tasks; when the broker is down, record them as unsent instead of failing.

    The steps are already queued in SQL; marking them unsent makes the scheduler's next
    pass send them as soon as the broker is back. Returns whether they were sent.
    """
    try:
        send_steps(app, queued)
        return True
    except broker_errors() as e:
        from stores.metadata.store import redact_url
        from zenml_workers.worker.broker import tls_refusal

        refused = tls_refusal(e, str(app.conf.broker_url or ""))
        if refused is not None:
            # No retry from here fixes it; a scheduler configured apart may still send them.
            log.error("%s; %d step task(s) recorded as unsent", refused, len(queued))
        else:
            log.warning(
                "cannot reach the broker at %s (%s: %s); %d step task(s) recorded as unsent: "
                "`zw scheduler` sends them once it is back (check ZW_BROKER_URL)",
                redact_url(str(app.conf.broker_url or "")),
                type(e).__name__,
                e,
                len(queued),
            )
    with metadata.transaction() as s:
        q.mark_unsent(s, [step.task.step_run_id for step in queued])
    return False


class RunEvents:
    """Run progress over Redis pub/sub, so ``wait()`` wakes without polling the database."""

    def __init__(self, broker_url: str, ssl_options: Mapping[str, Any] | None = None) -> None:
        self.enabled = broker_url.startswith(("redis://", "rediss://", "unix://"))
        self._url = broker_url
        #: redis-py's TLS arguments (:meth:`~zenml_workers.settings.Settings.broker_ssl_options`).
        self._ssl_options = dict(ssl_options or {})
        self._client: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @staticmethod
    def channel(run_id: str) -> str:
        return f"zw:run:{run_id}"

    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            import redis

            self._client = redis.Redis.from_url(self._url, **self._ssl_options)
            self._pid = os.getpid()
        return self._client

    def publish_refused(self, run_id: str, *, step: str, why: str) -> None:
        """Say that a worker refused ``step`` of the run for reason ``why`` (one sentence: it
        was planned in another metadata store), so ``wait()`` shows it."""
        if not self.enabled:
            return
        try:
            self.client.publish(self.channel(run_id), json.dumps({"step": step, "refused": why}))
        except Exception:  # the refusal is in the worker's log and on zw:dead-letter too
            log.warning("could not publish run event for run %s", run_id, exc_info=True)

    @staticmethod
    def refusal(message: object) -> str | None:
        """The refusal a pub/sub message of :meth:`channel` carries, None for other events."""
        data = message.get("data") if isinstance(message, dict) else None
        try:
            event = json.loads(data) if isinstance(data, bytes | str) else None
        except ValueError:
            return None
        why = event.get("refused") if isinstance(event, dict) else None
        return why if isinstance(why, str) and why else None

    def publish_idle(self, run_id: str, *, step: str) -> None:
        """Say that ``step`` finished without queueing anything, so the run may have ended."""
        if not self.enabled:
            return
        try:
            self.client.publish(self.channel(run_id), json.dumps({"step": step}))
        except Exception:  # waiters fall back to reading the run every half second
            log.warning("could not publish run event for run %s", run_id, exc_info=True)
