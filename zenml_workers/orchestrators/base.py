"""How a planned run's step tasks reach workers, and how a caller waits for the run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from scheduler.dispatch import QueuedStep
from stores.metadata.store import MetadataStore
from zenml_workers.settings import Settings

#: Called with (steps finished, steps total) while waiting.
ProgressCallback = Callable[[int, int], None]


class Orchestrator(ABC):
    """Sends step tasks and signals run progress. One per process and stack."""

    name: str = ""

    def __init__(self, settings: Settings, metadata: MetadataStore) -> None:
        self.settings = settings
        self.metadata = metadata

    @abstractmethod
    def send(self, run_id: str, queued: Sequence[QueuedStep]) -> None:
        """Hand tasks that a committed transaction queued to the workers."""

    @abstractmethod
    def wait_changed(self, run_id: str, timeout_s: float) -> bool:
        """Block until the run may have ended (True) or ``timeout_s`` passes (False)."""

    @abstractmethod
    def revoke(self, queued: Sequence[str], running: Sequence[str]) -> None:
        """Stop queued and running attempts (by task id) of a cancelled run (best effort)."""

    def idle(self, run_id: str) -> bool:
        """True when this orchestrator knows none of the run's steps is still in flight."""
        return False

    def refusal(self, run_id: str) -> str | None:
        """Why a worker refused one of the run's steps, as it said (e.g. planned in another
        metadata store), or None when none did."""
        return None

    def settle_idle(self, run_id: str) -> None:  # noqa: B027 - optional hook
        """Close a run that is idle here but still open in SQL (its last tasks were dropped)."""

    def forget(self, run_id: str) -> None:  # noqa: B027 - optional hook
        """Drop what this orchestrator holds for a run that ended."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes and connections."""
