"""The cluster orchestrator: step tasks on Redis, run by Celery workers anywhere."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

from scheduler.dispatch import QueuedStep
from stores.metadata.store import MetadataStore
from zenml_workers.orchestrators.base import Orchestrator
from zenml_workers.settings import Settings
from zenml_workers.worker.celery_app import broker_errors


class CeleryOrchestrator(Orchestrator):
    """Publishes step tasks to the broker and listens for run events on Redis pub/sub."""

    name = "celery"

    def __init__(self, settings: Settings, metadata: MetadataStore) -> None:
        super().__init__(settings, metadata)
        from zenml_workers.worker.celery_app import RunEvents, create_app
        from zenml_workers.worker.signing import require_key

        require_key(settings, "client")
        self.app = create_app(settings)
        self.events = RunEvents(settings.reveal_broker_url(), settings.broker_ssl_options())
        self._subs: dict[str, Any] = {}
        #: The first refusal a worker published for each run (see ``RunEvents.publish_refused``).
        self._refusals: dict[str, str] = {}
        self._lock = threading.Lock()

    def _subscribe_once(self, run_id: str) -> Any:
        with self._lock:
            sub = self._subs.get(run_id)
            if sub is None and self.events.enabled:
                sub = self.events.client.pubsub(ignore_subscribe_messages=True)
                sub.subscribe(self.events.channel(run_id))
                self._subs[run_id] = sub
            return sub

    def send(self, run_id: str, queued: Sequence[QueuedStep]) -> None:
        """Publish the run's first steps. With the broker down the run stays recorded and its
        steps are marked unsent: ``submit()`` returns and the scheduler sends them later."""
        from zenml_workers.worker.celery_app import send_or_mark_unsent

        # Subscribe before sending, so the run cannot end unseen in between.
        self._subscribe(run_id)
        send_or_mark_unsent(self.app, self.metadata, queued)

    def _subscribe(self, run_id: str) -> Any:
        try:
            return self._subscribe_once(run_id)
        except broker_errors():
            return None  # the broker is down: wait() reads SQL until it is back

    def wait_changed(self, run_id: str, timeout_s: float) -> bool:
        sub = self._subscribe(run_id)
        if sub is None:
            threading.Event().wait(timeout_s)
            return True
        try:
            # Workers publish only when a step queued nothing (the run may have ended) or
            # when they refused a step (wait() shows why).
            message = sub.get_message(timeout=timeout_s)
            why = self.events.refusal(message)
            if why is not None:
                self._refusals.setdefault(run_id, why)
            return message is not None
        except broker_errors():
            # The broker went away mid-wait: drop the subscription (a new one is made when it
            # is back) and let the caller read the run from SQL.
            self.forget(run_id)
            threading.Event().wait(timeout_s)
            return True

    def refusal(self, run_id: str) -> str | None:
        return self._refusals.get(run_id)

    def forget(self, run_id: str) -> None:
        with self._lock:
            sub = self._subs.pop(run_id, None)
            self._refusals.pop(run_id, None)
        if sub is not None:
            with contextlib.suppress(*broker_errors()):
                sub.close()

    def revoke(self, queued: Sequence[str], running: Sequence[str]) -> None:
        # ``cancel_run`` marked the steps cancelled in SQL first. A prefork worker terminates
        # a running step's pool process on this revoke; a solo worker cannot read it while its
        # step runs, so its step host sees the row turn cancelled and stops the step itself.
        if queued:
            self.app.control.revoke(queued)
        if running:
            self.app.control.revoke(running, terminate=True, signal="SIGTERM")

    def close(self) -> None:
        for run_id in list(self._subs):
            self.forget(run_id)
        self.app.close()
