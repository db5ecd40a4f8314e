"""The long-lived scheduler process (``zw scheduler``, ``python -m scheduler``).

Submitting and advancing runs needs no scheduler: ``submit()`` and the workers
do it in SQL transactions. This service covers what needs a clock: leases that
expired because a worker died, tasks the broker lost, runs waiting on a queue
no worker consumes. Kill and restart it at any time: all state is in SQL.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from scheduler.dispatch import QueuedStep
from scheduler.recovery import RecoveryPolicy, recover
from stores.metadata import queries as q
from stores.metadata import workers as w
from stores.metadata.store import MetadataStore

log = logging.getLogger("zenml_workers.scheduler")

Sender = Callable[[Sequence[QueuedStep]], object]


class BrokerWatch:
    """Tells whether the broker lost its queues since the last look.

    A marker key lives in Redis itself: a Redis that restarted without persistence (or was
    flushed) has lost the marker together with every queued message, so the scheduler
    resends every step that SQL says is queued. The marker survives a scheduler restart,
    so restarting the scheduler resends nothing.
    """

    KEY = "zw:broker-epoch"

    def __init__(
        self, broker_url: str | None, ssl_options: Mapping[str, Any] | None = None
    ) -> None:
        self.enabled = bool(broker_url) and broker_url.startswith(  # type: ignore[union-attr]
            ("redis://", "rediss://", "unix://")
        )
        self._url = broker_url or ""
        #: redis-py's TLS arguments for a ``rediss://`` broker (CA and client certificate files).
        self._ssl_options = dict(ssl_options or {})
        self._client: Any = None

    def _redis(self) -> Any:
        import redis

        if self._client is None:
            self._client = redis.Redis.from_url(
                self._url, socket_timeout=5, socket_connect_timeout=5, **self._ssl_options
            )
        return self._client

    def task_ids(self, queues: set[str]) -> set[str] | None:
        """Ids of the step tasks waiting on ``queues``, or None when the broker cannot be read.

        A step queued in SQL whose message is not waiting on its queue was delivered: a live
        worker claims a delivered message within milliseconds (workers prefetch nothing
        beyond what they run), so one still unclaimed after a while is with a worker that
        died (kombu keeps it "unacked" for the visibility timeout, hours) or vanished with a
        connection that broke mid-delivery. Either way it must be sent again.
        """
        import json

        import redis

        if not self.enabled:
            return None
        try:
            client = self._redis()
            raw = [m for q in sorted(queues) for m in client.lrange(q, 0, -1)]
        except (redis.RedisError, OSError):
            return None
        ids = set()
        for message in raw:
            try:
                payload = json.loads(message) if isinstance(message, bytes | str) else message
                ids.add(str(payload["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue  # garbage: the workers dead-letter it
        return ids

    def lost_queues(self) -> bool | None:
        """True when the broker came back empty (the marker is set anew), False when it kept its
        queues, None when it cannot be reached now."""
        if not self.enabled:
            return False
        import redis

        try:
            return bool(self._redis().set(self.KEY, uuid.uuid4().hex, nx=True))
        except (redis.RedisError, OSError):
            return None


class SchedulerService:
    """Runs :func:`~scheduler.recovery.recover` every ``interval_s`` and sends what it requeues.

    Args:
        metadata: the shared metadata store.
        send: publishes step tasks (the Celery sender in production); marks what it could not
            send for the next pass.
        policy: recovery thresholds.
        interval_s: seconds between passes.
        broker: watches for a broker that lost its queues (None: never lost).
    """

    def __init__(
        self,
        metadata: MetadataStore,
        send: Sender,
        *,
        policy: RecoveryPolicy,
        interval_s: float = 2.0,
        broker: BrokerWatch | None = None,
    ) -> None:
        self.metadata = metadata
        self.send = send
        self.policy = policy
        self.interval_s = interval_s
        self.worker_ttl_s = policy.lease.worker_ttl_s
        self.broker = broker or BrokerWatch(None)
        #: Since when every pass could read the store (None: the last one failed).
        self.watching_since: float | None = None
        self._resend_all = False
        self._checked_broker_at = 0.0
        self._stop = threading.Event()
        #: What recovery did since this service started, by kind (exported as metrics).
        #: Counted only for passes whose transaction committed.
        self.events: collections.Counter[str] = collections.Counter()

    def run_once(self, now: float | None = None) -> list[QueuedStep]:
        """One recovery pass; returns what it sent.

        Raises:
            MetadataStoreError: the store could not be read (the next pass waits one worker
                TTL before it calls silent workers gone again).
        """
        now = time.time() if now is None else now
        if self.broker.lost_queues():
            log.warning("the broker lost its queues (restarted empty?); resending queued steps")
            self._resend_all = True
        try:
            missing = self._missing_from_broker(now)
            events: collections.Counter[str] = collections.Counter()
            with self.metadata.transaction() as s:
                out = recover(
                    s,
                    now=now,
                    policy=self.policy,
                    judge_heartbeats=self.policy.lease.may_judge_heartbeats(
                        self.watching_since, now
                    ),
                    resend_all_queued=self._resend_all,
                    resend=missing,
                    events=events,
                )
            self.events.update(events)
        except Exception:
            self.watching_since = None
            raise
        self._resend_all = False
        if self.watching_since is None:
            self.watching_since = now
        self.send(out)
        self.flag_blocked_runs(now)
        return out

    def _missing_from_broker(self, now: float) -> list[str]:
        """Step runs queued in SQL for a while whose message the broker no longer has (looked
        for every ``broker_check_every_s``)."""
        policy = self.policy
        if not self.broker.enabled or now - self._checked_broker_at < policy.broker_check_every_s:
            return []
        self._checked_broker_at = now
        with self.metadata.read() as s:
            waiting = q.stale_queued(s, now - policy.broker_check_after_s)
        if not waiting:
            return []
        present = self.broker.task_ids({r.queue for r in waiting})
        if present is None:
            return []
        gone = [r.id for r in waiting if r.task_id not in present]
        if gone:
            log.warning("%d queued step(s) are missing from the broker; resending", len(gone))
        return gone

    def flag_blocked_runs(self, now: float) -> None:
        """Write a message on runs whose steps wait on a queue that no live worker consumes."""
        with self.metadata.transaction() as s:
            w.forget_workers(s, older_than=now - 86400)  # gone for a day: drop its row
            live = w.live_queues(s, now=now, max_age_s=self.worker_ttl_s)
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
