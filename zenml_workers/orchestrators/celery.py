"""The cluster orchestrator: step tasks on Redis, run by Celery workers anywhere."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from scheduler.dispatch import QueuedStep
from stores.metadata.store import MetadataStore
from zenml_workers.orchestrators.base import Orchestrator
from zenml_workers.settings import Settings


class CeleryOrchestrator(Orchestrator):
    """Publishes step tasks to the broker and listens for run events on Redis pub/sub."""

    name = "celery"

    def __init__(self, settings: Settings, metadata: MetadataStore) -> None:
        super().__init__(settings, metadata)
        from zenml_workers.worker.celery_app import RunEvents, create_app

        self.app = create_app(settings)
        self.events = RunEvents(settings.broker_url or "")
        self._subs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _subscribe(self, run_id: str) -> Any:
        with self._lock:
            sub = self._subs.get(run_id)
            if sub is None and self.events.enabled:
                sub = self.events.client.pubsub(ignore_subscribe_messages=True)
                sub.subscribe(self.events.channel(run_id))
                self._subs[run_id] = sub
            return sub

    def send(self, run_id: str, queued: Sequence[QueuedStep]) -> None:
        from zenml_workers.worker.celery_app import send_steps

        # Subscribe before sending, so the run cannot end unseen in between.
        self._subscribe(run_id)
        send_steps(self.app, queued)

    def wait_changed(self, run_id: str, timeout_s: float) -> bool:
        sub = self._subscribe(run_id)
        if sub is None:
            threading.Event().wait(timeout_s)
            return True
        # Workers publish only when a step queued nothing: the run may have ended.
        return sub.get_message(timeout=timeout_s) is not None

    def forget(self, run_id: str) -> None:
        with self._lock:
            sub = self._subs.pop(run_id, None)
        if sub is not None:
            sub.close()

    def revoke(self, queued: Sequence[str], running: Sequence[str]) -> None:
        if queued:
            self.app.control.revoke(queued)
        if running:
            self.app.control.revoke(running, terminate=True, signal="SIGTERM")

    def close(self) -> None:
        for run_id in list(self._subs):
            self.forget(run_id)
        self.app.close()
