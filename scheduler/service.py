"""The long-lived scheduler process (``zw scheduler``, ``python -m scheduler``).

Submitting and advancing runs needs no scheduler: ``submit()`` and the workers
do it in SQL transactions. This service covers what needs a clock: leases that
expired because a worker died, tasks the broker lost, runs waiting on a queue
no worker consumes. Kill and restart it at any time: all state is in SQL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from scheduler.dispatch import QueuedStep
from scheduler.recovery import RecoveryPolicy, recover
from stores.metadata import queries as q
from stores.metadata.store import MetadataStore

log = logging.getLogger("zenml_workers.scheduler")

Sender = Callable[[Sequence[QueuedStep]], None]


class SchedulerService:
    """Runs :func:`~scheduler.recovery.recover` every ``interval_s`` and sends what it requeues.

    Args:
        metadata: the shared metadata store.
        send: publishes step tasks (the Celery sender in production).
        policy: recovery thresholds.
        interval_s: seconds between passes.
        worker_ttl_s: a worker whose heartbeat is older counts as gone.
    """

    def __init__(
        self,
        metadata: MetadataStore,
        send: Sender,
        *,
        policy: RecoveryPolicy,
        interval_s: float = 5.0,
        worker_ttl_s: float = 60.0,
    ) -> None:
        self.metadata = metadata
        self.send = send
        self.policy = policy
        self.interval_s = interval_s
        self.worker_ttl_s = worker_ttl_s
        self._stop = threading.Event()

    def run_once(self, now: float | None = None) -> list[QueuedStep]:
        """One recovery pass; returns what it sent."""
        now = time.time() if now is None else now
        with self.metadata.transaction() as s:
            out = recover(s, now=now, policy=self.policy)
        self.send(out)
        self.flag_blocked_runs(now)
        return out

    def flag_blocked_runs(self, now: float) -> None:
        """Write a message on runs whose steps wait on a queue that no live worker consumes."""
        with self.metadata.transaction() as s:
            q.forget_workers(s, older_than=now - 86400)  # gone for a day: drop its row
            live = q.live_queues(s, now=now, max_age_s=self.worker_ttl_s)
            for queue, steps in q.waiting_queues(s).items():
                if queue in live:
                    continue
                for run_id in {rid for rid, _ in steps}:
                    q.set_run_message(
                        s,
                        run_id,
                        f"steps wait on queue {queue!r}, which no live worker consumes; "
                        f"start one with `zw worker --queues {queue}`",
                    )

    def serve_forever(self) -> None:
        log.info("scheduler started; recovery pass every %.1fs", self.interval_s)
        while not self._stop.is_set():
            try:
                sent = self.run_once()
                if sent:
                    log.info("recovery sent %d step task(s)", len(sent))
            except Exception:
                log.exception("recovery pass failed; retrying in %.1fs", self.interval_s)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
