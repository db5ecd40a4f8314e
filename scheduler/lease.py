"""The lease policy: how long an attempt may run unheard, and who may take a step over.

A claimed attempt holds a lease in SQL that its worker renews every heartbeat
interval. It ends in one of four ways, all decided here as pure functions of the
recorded state and ``now`` (tested without sleeping):

- **renewal stops** (the worker froze or lost the database): recovery requeues the
  step once the lease has expired;
- **the worker is silent**: its heartbeat row is older than the worker TTL (a
  preempted VM, a SIGKILLed main process, a partition), or it said it stopped;
  recovery expires its leases at once instead of waiting for them to run out;
- **the worker came back under the same node name**: it holds nothing yet, so
  every lease recorded for that node before it booted belongs to a dead process;
- **the broker redelivers the message** (Celery requeues the task of a pool child
  that died): the worker receiving it takes the step over at once when the lease
  holder is provably dead (same node, process gone), else drops the duplicate;
- **a pool child died but the redelivery went elsewhere**: the dead child's own worker
  (its main process, which outlives its children) expires, at its next heartbeat, the
  leases recorded under its node for processes that are no longer its children.

A lost worker costs an attempt; a step survives ``lost_workers_tolerated`` losses on top
of its own attempts, so worker deaths never use up the retries meant for its exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from stores.metadata.states import RunStatus, StepStatus


class Redelivery(StrEnum):
    """What a worker does with a step message whose claim failed."""

    DROP = "drop"  # someone else has it (or it ended): a duplicate delivery
    TAKE_OVER = "take_over"  # the attempt's process is dead: start a new attempt here
    GIVE_UP = "give_up"  # dead again, and out of attempts: fail the step


@dataclass(frozen=True)
class LeasePolicy:
    """Lease, heartbeat and takeover timing. Units in seconds.

    Args:
        lease_s: lease of an attempt whose step has no ``timeout_s``.
        heartbeat_interval_s: how often workers renew leases and write their heartbeat row.
        worker_ttl_s: a worker whose heartbeat row is older counts as gone.
        timeout_margin_s: added to a step's ``timeout_s`` for its lease (at least one heartbeat).
    """

    lease_s: float = 120.0
    heartbeat_interval_s: float = 2.0
    worker_ttl_s: float = 10.0
    timeout_margin_s: float = 30.0

    def lease_for(self, timeout_s: float | None) -> float:
        """Seconds an attempt's claim is valid before recovery may requeue it."""
        if timeout_s:
            return timeout_s + max(self.timeout_margin_s, self.heartbeat_interval_s)
        return self.lease_s

    #: Worker losses a step survives on top of its own attempts (a preempted VM, an OOM kill,
    #: a partition): each costs an attempt, but never one of the step's ``retries``.
    lost_workers_tolerated: int = 2

    def attempts_after_lost_worker(self, max_attempts: int) -> int:
        """Attempts a step may use when its workers keep dying: its own plus the tolerance."""
        return max_attempts + self.lost_workers_tolerated

    def silent_before(self, now: float) -> float:
        """A worker whose last heartbeat is older than this (or that said it stopped) is gone."""
        return now - self.worker_ttl_s

    def may_judge_heartbeats(self, watching_since: float | None, now: float) -> bool:
        """Whether an observer that could read the store continuously since ``watching_since``
        may call a silent worker gone. Right after a database outage (or the observer's own
        start) every heartbeat looks old; waiting one TTL lets live workers write again."""
        return watching_since is not None and now - watching_since >= self.worker_ttl_s

    def on_redelivery(
        self,
        holder: Any,
        *,
        host: str,
        pid: int,
        running_here: bool,
        pid_alive: Callable[[int], bool],
    ) -> Redelivery:
        """Decide about a message for a step this worker could not claim.

        ``holder`` has the step's ``status``, ``attempt``, ``max_attempts``, ``worker_host``,
        ``worker_pid`` and its run's ``run_status`` (None: the step does not exist).
        ``running_here`` says this process is running that step right now.
        """
        if holder is None or holder.run_status != RunStatus.RUNNING.value:
            return Redelivery.DROP
        if holder.status != StepStatus.RUNNING.value or holder.worker_host != host:
            # Another node's process cannot be checked from here; its heartbeat and lease can.
            return Redelivery.DROP
        if holder.worker_pid == pid:
            dead = not running_here  # our own claim, but nothing here runs it any more
        else:
            dead = holder.worker_pid is None or not pid_alive(holder.worker_pid)
        if not dead:
            return Redelivery.DROP
        if holder.attempt >= self.attempts_after_lost_worker(holder.max_attempts):
            return Redelivery.GIVE_UP
        return Redelivery.TAKE_OVER
