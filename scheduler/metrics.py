"""How many workers each queue wants, and the scheduler's Prometheus metrics.

A queue's demand is what SQL says, not the broker's list: with a per-run broker window
(``ZW_MAX_QUEUED_PER_RUN``) most of a large fan-out waits as ``ready`` rows while only the
window is on Redis, so the list's length (``LLEN``) under-counts it. The number of workers a
queue wants is::

    wanted = min(max_workers, ceil((ready + running) / concurrency_per_worker))

where ``ready`` counts the steps whose inputs exist and that have not started (waiting in SQL
for a window slot, or on the broker), ``running`` those holding a lease, and
``concurrency_per_worker`` is the mean pool size of the live workers on that queue (the
heartbeat records it), or the caller's default when none reports one. No demand wants 0
workers, so a queue can scale to zero.

:func:`queue_loads` computes it for ``zw queues``; :class:`SchedulerCollector` serves it,
with run and step totals and recovery events, to Prometheus from ``zw scheduler
--metrics-port``. Built once at the edge; nothing here registers anything at import time.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stores.metadata import workers as w
from stores.metadata.models import RunRow, StepRunRow
from stores.metadata.states import RunStatus, StepStatus
from stores.metadata.store import MetadataStore, redact_url

log = logging.getLogger("zenml_workers.scheduler")

#: kombu's Redis transport keeps a queue's priority levels 3, 6 and 9 on ``<queue><SEP><n>``
#: lists beside ``<queue>`` itself (level 0); ``LLEN`` counts all four.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_LEVELS = (3, 6, 9)

#: Run and step statuses whose totals are exported (each only grows: runs are never deleted).
RUN_TOTALS = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)
STEP_TOTALS = (
    StepStatus.COMPLETED,
    StepStatus.CACHED,
    StepStatus.FAILED,
    StepStatus.SKIPPED,
    StepStatus.CANCELLED,
)
#: The recovery events the scheduler counts itself (``recover(events=...)``).
RECOVERY_KINDS = ("requeue", "resend", "silent_worker", "lost_worker_failure")


@dataclass(frozen=True)
class QueueLoad:
    """One queue's demand and supply at one moment.

    Attributes:
        ready: steps whose inputs exist and that have not started: waiting in SQL for a slot
            in their run's broker window, or sent to the broker (``queued`` of them).
        queued: of ``ready``, those sent to the broker (SQL status ``queued``).
        on_broker: messages on the broker's list (``LLEN``); None when it could not be read.
        running: steps holding a lease.
        workers: live workers consuming the queue (heartbeat younger than the worker TTL).
        slots: their pool sizes added up (a worker on several queues counts for each).
        per_worker: the concurrency per worker the formula divides by.
        wanted: workers the queue wants (see the module's formula).
    """

    queue: str
    ready: int
    queued: int
    on_broker: int | None
    running: int
    workers: int
    slots: int
    per_worker: float
    wanted: int


def wanted_workers(
    *, ready: int, running: int, per_worker: float, max_workers: int | None = None
) -> int:
    """``ceil((ready + running) / per_worker)``, at most ``max_workers`` (None: unbounded).

    Raises:
        ValueError: ``per_worker`` is not positive or ``max_workers`` is negative.
    """
    if per_worker <= 0:
        raise ValueError(f"the concurrency per worker must be positive, not {per_worker}")
    if max_workers is not None and max_workers < 0:
        raise ValueError(f"max_workers must be 0 or more, not {max_workers}")
    demand = ready + running
    wanted = math.ceil(demand / per_worker) if demand > 0 else 0
    return wanted if max_workers is None else min(wanted, max_workers)


def queue_loads(
    s: Session,
    *,
    now: float,
    worker_ttl_s: float,
    queues: Iterable[str] = (),
    broker_lengths: Callable[[list[str]], Mapping[str, int] | None] | None = None,
    default_concurrency: int = 1,
    max_workers: int | None = None,
) -> list[QueueLoad]:
    """The load of every queue named in ``queues``, holding a step, or consumed by a live
    worker, by name. ``broker_lengths`` reads the broker's list lengths (see
    :class:`BrokerLengths`); ``default_concurrency`` is the concurrency per worker assumed
    for a queue no live worker reports one for.

    Raises:
        ValueError: ``default_concurrency`` is not positive.
    """
    if default_concurrency <= 0:
        raise ValueError(f"default_concurrency must be positive, not {default_concurrency}")
    demand = w.queue_demand(s)
    live = w.live_workers(s, now=now, max_age_s=worker_ttl_s)
    names = sorted({*queues, *demand, *(q for worker in live for q in worker.queues)})
    lengths = broker_lengths(names) if broker_lengths is not None and names else None
    out = []
    for queue in names:
        counts = demand.get(queue, {})
        ready_sql = counts.get(StepStatus.READY.value, 0)
        queued = counts.get(StepStatus.QUEUED.value, 0)
        running = counts.get(StepStatus.RUNNING.value, 0)
        consumers = [worker for worker in live if queue in worker.queues]
        known = [worker.concurrency for worker in consumers if worker.concurrency > 0]
        per_worker = sum(known) / len(known) if known else float(default_concurrency)
        out.append(
            QueueLoad(
                queue=queue,
                ready=ready_sql + queued,
                queued=queued,
                on_broker=None if lengths is None else int(lengths.get(queue, 0)),
                running=running,
                workers=len(consumers),
                slots=sum(known),
                per_worker=per_worker,
                wanted=wanted_workers(
                    ready=ready_sql + queued,
                    running=running,
                    per_worker=per_worker,
                    max_workers=max_workers,
                ),
            )
        )
    return out


class BrokerLengths:
    """Reads how many messages wait on each queue's Redis list (``LLEN``, priority lists
    included). A broker that is not Redis, or cannot be read, gives None."""

    def __init__(self, broker_url: str | None, ssl_options: Mapping[str, Any] | None = None):
        self.enabled = bool(broker_url) and str(broker_url).startswith(
            ("redis://", "rediss://", "unix://")
        )
        self._url = broker_url or ""
        self._ssl_options = dict(ssl_options or {})
        self._client: Any = None
        self._lock = threading.Lock()
        #: Why the last read failed (None: it did not), for a warning line.
        self.error: str | None = None

    def __call__(self, queues: list[str]) -> dict[str, int] | None:
        if not self.enabled:
            return None
        import redis

        with self._lock:
            try:
                if self._client is None:
                    self._client = redis.Redis.from_url(
                        self._url, socket_timeout=5, socket_connect_timeout=5, **self._ssl_options
                    )
                with self._client.pipeline(transaction=False) as pipe:
                    for queue in queues:
                        pipe.llen(queue)
                        for level in _PRIORITY_LEVELS:
                            pipe.llen(f"{queue}{_PRIORITY_SEP}{level}")
                    replies = pipe.execute()
            except (redis.RedisError, OSError) as e:
                self.error = (
                    f"cannot read queue lengths from the broker at {redact_url(self._url)} "
                    f"({type(e).__name__}: {e}); check ZW_BROKER_URL and that Redis is up"
                )
                return None
        self.error = None
        per = 1 + len(_PRIORITY_LEVELS)
        return {
            q: sum(int(n) for n in replies[i * per : (i + 1) * per]) for i, q in enumerate(queues)
        }

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def status_totals(s: Session) -> tuple[dict[str, int], dict[str, int]]:
    """How many runs and step runs ended in each exported status (:data:`RUN_TOTALS`,
    :data:`STEP_TOTALS`), from two grouped counts."""
    runs = dict.fromkeys((st.value for st in RUN_TOTALS), 0)
    for status, n in s.execute(
        select(RunRow.status, func.count())
        .where(RunRow.status.in_(list(runs)))
        .group_by(RunRow.status)
    ):
        runs[status] = int(n)
    steps = dict.fromkeys((st.value for st in STEP_TOTALS), 0)
    for status, n in s.execute(
        select(StepRunRow.status, func.count())
        .where(StepRunRow.status.in_(list(steps)))
        .group_by(StepRunRow.status)
    ):
        steps[status] = int(n)
    return runs, steps


class SchedulerCollector:
    """A Prometheus collector read at each scrape: the queues' loads, run and step totals
    from SQL, the scheduler's own recovery events and the workers' takeovers.

    Args:
        metadata: the cluster's metadata store (read once per scrape).
        queues: the stack's configured queues (listed even when idle).
        worker_ttl_s: a worker whose heartbeat is older is not counted.
        broker_lengths: reads the broker's list lengths.
        recovery: the scheduler's recovery-event counter (``SchedulerService.events``).
        default_concurrency, max_workers: as in :func:`queue_loads`.
        clock: returns the current Unix time in seconds.
    """

    def __init__(
        self,
        metadata: MetadataStore,
        *,
        queues: Iterable[str],
        worker_ttl_s: float,
        broker_lengths: Callable[[list[str]], Mapping[str, int] | None] | None,
        recovery: Counter[str],
        default_concurrency: int = 1,
        max_workers: int | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.metadata = metadata
        self.queues = list(queues)
        self.worker_ttl_s = worker_ttl_s
        self.broker_lengths = broker_lengths
        self.recovery = recovery
        self.default_concurrency = default_concurrency
        self.max_workers = max_workers
        self.clock = clock

    def describe(self) -> list[Any]:
        # Nothing described up front: registering must not read the database.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily(
            "zw_metadata_store_up", "1 when this scrape could read the metadata store, else 0"
        )
        try:
            with self.metadata.read() as s:
                loads = queue_loads(
                    s,
                    now=self.clock(),
                    worker_ttl_s=self.worker_ttl_s,
                    queues=self.queues,
                    broker_lengths=self.broker_lengths,
                    default_concurrency=self.default_concurrency,
                    max_workers=self.max_workers,
                )
                runs, steps = status_totals(s)
                takeovers = w.takeovers(s)
        except Exception as e:  # a scrape must answer; the gauge says the store was away
            log.warning("metrics scrape could not read the metadata store: %s", e)
            up.add_metric([], 0)
            yield up
            yield self._recovery(CounterMetricFamily)
            return
        up.add_metric([], 1)
        yield up
        gauges = {
            "ready_steps": "Steps whose inputs exist and that have not started (in SQL or on the broker)",
            "queued_steps": "Of the ready steps, those sent to the broker",
            "broker_messages": "Messages on the queue's broker list (LLEN)",
            "running_steps": "Steps holding a lease",
            "workers": "Live workers consuming the queue",
            "worker_slots": "Pool slots of the live workers consuming the queue",
            "wanted_workers": "Workers the queue wants: ceil((ready + running) / concurrency per worker)",
        }
        families = {
            key: GaugeMetricFamily(f"zw_queue_{key}", text, labels=["queue"])
            for key, text in gauges.items()
        }
        for load in loads:
            values = {
                "ready_steps": load.ready,
                "queued_steps": load.queued,
                "broker_messages": load.on_broker,
                "running_steps": load.running,
                "workers": load.workers,
                "worker_slots": load.slots,
                "wanted_workers": load.wanted,
            }
            for key, value in values.items():
                if value is not None:
                    families[key].add_metric([load.queue], value)
        yield from families.values()
        run_family = CounterMetricFamily("zw_runs", "Runs that ended, by status", labels=["status"])
        for status, n in runs.items():
            run_family.add_metric([status], n)
        yield run_family
        step_family = CounterMetricFamily(
            "zw_steps", "Step runs that ended, by status", labels=["status"]
        )
        for status, n in steps.items():
            step_family.add_metric([status], n)
        yield step_family
        yield self._recovery(CounterMetricFamily)
        takeover_family = CounterMetricFamily(
            "zw_worker_takeovers",
            "Steps a worker took over after their process was found dead",
            labels=["worker"],
        )
        for worker, n in sorted(takeovers.items()):
            takeover_family.add_metric([worker], n)
        yield takeover_family

    def _recovery(self, family: Any) -> Any:
        out = family(
            "zw_recovery_events",
            "What this scheduler's recovery passes did: requeued expired leases, resent lost "
            "messages, ended the leases of silent workers, failed steps that lost workers too often",
            labels=["kind"],
        )
        for kind in RECOVERY_KINDS:
            out.add_metric([kind], self.recovery.get(kind, 0))
        return out


def serve_metrics(collector: SchedulerCollector, *, port: int, address: str) -> Any:
    """Serve ``collector`` on ``http://address:port/metrics`` from a daemon thread, in a
    registry of its own; returns the server (its ``shutdown()`` stops it).

    Raises:
        OSError: the port cannot be bound.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
