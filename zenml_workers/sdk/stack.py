"""The active stack: settings plus the stores and orchestrator they name, built once per process."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stores.artifacts import ArtifactStore
    from stores.metadata.store import MetadataStore
    from zenml_workers.orchestrators.base import Orchestrator
    from zenml_workers.settings import Settings


@dataclass
class Stack:
    """Connections for one set of settings. Nothing connects until first used."""

    settings: Settings
    metadata: MetadataStore
    artifacts: ArtifactStore
    _orchestrator: Orchestrator | None = None
    _checked: bool = False

    @property
    def orchestrator(self) -> Orchestrator:
        if self._orchestrator is None:
            if self.settings.is_embedded:
                from zenml_workers.orchestrators.local import LocalOrchestrator

                self._orchestrator = LocalOrchestrator(self.settings, self.metadata)
            else:
                from zenml_workers.orchestrators.celery import CeleryOrchestrator

                self._orchestrator = CeleryOrchestrator(self.settings, self.metadata)
        return self._orchestrator

    def check(self) -> None:
        """Probe the artifact store once per process, so bad credentials fail at submit time.

        Raises:
            ArtifactStoreError: the store is unreachable or rejects the credentials.
        """
        if not self._checked:
            self.artifacts.check()
            self._checked = True

    def close(self) -> None:
        if self._orchestrator is not None:
            self._orchestrator.close()
            self._orchestrator = None
        self.metadata.dispose()


_stacks: dict[str, Stack] = {}
_lock = threading.Lock()


def get_stack(settings: Settings | None = None) -> Stack:
    """The stack for ``settings`` (default: from the environment), reused within the process."""
    if settings is None:
        from zenml_workers.settings import load_settings  # pydantic: only once a run needs it

        settings = load_settings()
    key = settings.identity()
    with _lock:
        stack = _stacks.get(key)
        if stack is None:
            from stores.artifacts import artifact_store_from_uri
            from stores.metadata.store import MetadataStore

            stack = Stack(
                settings=settings,
                metadata=MetadataStore(
                    settings.resolved_metadata_url(),
                    connect_args=settings.metadata_connect_args(),
                ),
                artifacts=artifact_store_from_uri(
                    settings.resolved_artifact_uri(), **settings.s3_options()
                ),
            )
            _stacks[key] = stack
        return stack


def close_stacks() -> None:
    """Close every stack this process opened (tests and long-lived notebooks)."""
    with _lock:
        for stack in _stacks.values():
            stack.close()
        _stacks.clear()
