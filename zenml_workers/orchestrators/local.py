"""The embedded default orchestrator: local worker processes, SQLite, a local folder."""

from __future__ import annotations

import time
from collections.abc import Sequence

from scheduler.dispatch import QueuedStep, finish_run_if_done
from scheduler.outcomes import fail_run
from stores.metadata import attempts
from stores.metadata import queries as q
from stores.metadata.states import Move, StepStatus
from stores.metadata.store import MetadataStore
from zenml_workers.orchestrators.base import Orchestrator
from zenml_workers.orchestrators.pool import LocalPool, RunTracker
from zenml_workers.settings import Settings


class LocalOrchestrator(Orchestrator):
    """Runs steps in a process pool of this machine; needs no server."""

    name = "local"

    def __init__(self, settings: Settings, metadata: MetadataStore) -> None:
        super().__init__(settings, metadata)
        self.pool = LocalPool(settings, metadata)
        self._trackers: dict[str, RunTracker] = {}

    def _tracker(self, run_id: str) -> RunTracker:
        tracker = self._trackers.get(run_id)
        if tracker is None:
            tracker = self._trackers[run_id] = RunTracker(run_id)
        return tracker

    def send(self, run_id: str, queued: Sequence[QueuedStep]) -> None:
        self.pool.send(list(queued), self._tracker(run_id))

    def wait_changed(self, run_id: str, timeout_s: float) -> bool:
        tracker = self._trackers.get(run_id)
        if tracker is None:
            return True
        if not tracker.done.wait(timeout_s):
            return False
        if tracker.error is not None:
            # A step's error escaped its worker process (e.g. the database stayed away for the
            # whole retry budget), so nothing recorded it: nothing else will finish the run.
            now = time.time()
            with self.metadata.transaction() as s:
                fail_run(s, run_id, f"the run stopped: {tracker.error}", now=now)
                # Steps that were running in the dead process will never report back.
                for row in q.step_runs(s, run_id):
                    if row.status == StepStatus.RUNNING.value:
                        attempts.finish_attempt(
                            s,
                            row.id,
                            row.attempt,
                            Move.FAIL,
                            ended_at=now,
                            exception=f"WorkerLostError: {tracker.error}",
                        )
        return True

    def settle_idle(self, run_id: str) -> None:
        """Close a run whose tasks have all returned but which is still open (its last tasks were
        dropped, e.g. after a cancel)."""
        with self.metadata.transaction() as s:
            finish_run_if_done(s, run_id, now=time.time())

    def idle(self, run_id: str) -> bool:
        """True when none of the run's steps is left in the pool."""
        tracker = self._trackers.get(run_id)
        return tracker is None or tracker.done.is_set()

    def forget(self, run_id: str) -> None:
        self._trackers.pop(run_id, None)
        self.pool.forget(run_id)

    def revoke(self, queued: Sequence[str], running: Sequence[str]) -> None:
        # Queued pool items find their run cancelled when they try to claim and drop
        # themselves; the pool reads the running ones' rows now and stops them.
        if running:
            self.pool.look_now()

    def close(self) -> None:
        self.pool.shutdown()
