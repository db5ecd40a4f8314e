"""The chaos bench's fault-injection loop: :class:`Killer` strikes the planned faults on a
cluster (worker and pool kills, Redis and PostgreSQL restarts, a partition) and records them."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bench.chaos.report import (
    PARTITION,
    PARTITION_S,
    POOL_KILL,
    POSTGRES_RESTART,
    REDIS_RESTART,
    WORKER_KILL,
    Fault,
)
from bench.report import progress

if TYPE_CHECKING:
    from tests.faults.harness import FaultCluster
    from tests.services.process import ServiceProcess

__all__ = ["POSTGRES_DOWN_S", "Killer"]

POSTGRES_DOWN_S = 3.0


@dataclass
class _Slot:
    """A worker the killer may kill and replace."""

    base: str
    pool: str
    in_net: bool
    proc: ServiceProcess | None = None
    name: str = ""


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Killer:
    """Strikes faults on ``cluster`` and records them."""

    def __init__(self, cluster: FaultCluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.faults: list[Fault] = []
        #: Faults that could not be struck (``kind: error``); they are not in ``faults``.
        self.failures: list[str] = []
        self.slots = [
            _Slot("cpu@p1", "prefork", in_net=False),
            _Slot("cpu@p2", "prefork", in_net=True),
            _Slot("cpu@s1", "solo", in_net=False),
        ]
        self._replacements = 0
        self._lock = threading.Lock()  # the heal timer and the killer both record
        self._partition: int | None = None  # index in faults of the open partition
        self._timer: threading.Timer | None = None
        self._deadline = float("inf")

    @property
    def partitioned(self) -> bool:
        return self._partition is not None

    def start_worker(self, slot: _Slot, name: str) -> None:
        slot.name = name
        slot.proc = self.cluster.start_worker(
            name, concurrency=2, pool=slot.pool, in_net=slot.in_net
        )

    def run(self, plan: Sequence[tuple[float, str]], t0: float, deadline: float) -> None:
        """Strike the planned faults (offsets from ``t0``); returns by ``deadline`` (plus the
        time the last fault takes)."""
        self._deadline = deadline
        for offset, kind in plan:
            time.sleep(max(0.0, min(t0 + offset, deadline) - time.time()))
            if time.time() >= deadline:
                return
            self.strike(kind)

    def strike(self, kind: str) -> None:
        try:
            if kind == REDIS_RESTART:
                at = time.time()
                self.cluster.redis.restart()
                self._record(Fault(kind, at, time.time(), "redis"))
            elif kind == POSTGRES_RESTART:
                at = time.time()
                self.cluster.postgres.kill()
                time.sleep(POSTGRES_DOWN_S)
                self.cluster.postgres.start()
                self._record(Fault(kind, at, time.time(), "postgres"))
            elif kind == PARTITION:
                self._cut()
            elif kind == POOL_KILL and self._kill_pool_child():
                pass
            else:
                self._kill_worker()
        except Exception as e:  # a fault that could not be struck is reported, not fatal
            progress(f"chaos: {kind} failed: {type(e).__name__}: {e}")
            self.failures.append(f"{kind} at {time.time():.1f}: {type(e).__name__}: {e}")
        self.revive()

    def _cut(self) -> None:
        """Partition the namespace; a timer heals it :data:`PARTITION_S` later (or at the
        deadline), so a slow worker start in the meantime does not lengthen it."""
        assert self.cluster.net is not None
        self.cluster.net.partition()
        with self._lock:
            self._partition = len(self.faults)
        self._record(Fault(PARTITION, time.time(), None, self.slots[1].name))
        delay_s = max(0.0, min(PARTITION_S, self._deadline - time.time()))
        self._timer = threading.Timer(delay_s, self.heal)
        self._timer.daemon = True
        self._timer.start()

    def heal(self) -> None:
        """End the open partition, if any."""
        with self._lock:
            if self._partition is None:
                return
            assert self.cluster.net is not None
            self.cluster.net.heal()
            self.faults[self._partition] = replace(self.faults[self._partition], until=time.time())
            self._partition = None
        progress("chaos: partition healed")

    def end_partition(self) -> None:
        """Stop the heal timer and heal now: nothing else (the cluster is being stopped)."""
        if self._timer is not None:
            self._timer.cancel()
        self.heal()

    def settle(self) -> None:
        """Heal an open partition, start every stopped service and worker."""
        self.end_partition()
        self.cluster.ensure_services()
        self.revive()

    def revive(self) -> None:
        """Start a replacement for every worker that is not running (a failed start)."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.is_running():
                continue
            if slot.in_net and self.partitioned:
                continue  # it could not reach the broker to say it is ready
            try:
                self.start_worker(slot, slot.name or slot.base)
            except Exception as e:
                progress(f"chaos: could not start {slot.name}: {type(e).__name__}: {e}")

    def _kill_worker(self) -> None:
        slots = [
            s
            for s in self.slots
            if s.proc is not None and s.proc.is_running() and not (s.in_net and self.partitioned)
        ]
        slot = self.rng.choice(slots)
        assert slot.proc is not None
        at, pid, old = time.time(), slot.proc.pid, slot.name
        slot.proc.kill()
        self._replacements += 1
        same = self._replacements % 2 == 1
        name = slot.base if same else f"{slot.base}-r{self._replacements}"
        try:
            self.start_worker(slot, name)
            detail = f"pid {pid}; replaced by {name}"
        except Exception as e:
            slot.name = name
            detail = f"pid {pid}; replacement {name} failed: {type(e).__name__}: {e}"
        self._record(Fault(WORKER_KILL, at, target=old, detail=detail))

    def _kill_pool_child(self) -> bool:
        from tests.services.process import descendants

        choices = [
            (s, c)
            for s in self.slots
            if s.pool == "prefork" and s.proc is not None and s.proc.is_running()
            for c in descendants(s.proc.pid)
            if _parent_of(c) == s.proc.pid
        ]
        if not choices:
            return False
        slot, child = self.rng.choice(choices)
        at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        self._record(Fault(POOL_KILL, at, target=slot.name, detail=f"pid {child}"))
        return True

    def _record(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)
        progress(f"chaos: {fault.kind} {fault.target} {fault.detail}".rstrip())
