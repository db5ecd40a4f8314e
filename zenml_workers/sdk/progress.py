"""Progress of a run while ``wait()`` blocks, for a person watching it.

A :class:`Snapshot` is what one read of the metadata store says about a run: its steps'
statuses, queues and workers and, on a cluster, the live workers of the queues its steps
wait on. Pure functions here turn a snapshot into text lines, one plain line or HTML; the
displays of :mod:`zenml_workers.sdk.display` show them (rich on a terminal, an updating
``IPython.display`` in a Jupyter kernel, plain lines otherwise). :class:`ProgressReporter`
reads at most one snapshot per ``min_interval_s`` and hands it to its display.
"""

from __future__ import annotations

import html
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zenml_workers.sdk.client import RunView
    from zenml_workers.sdk.display import Display
    from zenml_workers.sdk.stack import Stack

log = logging.getLogger("zenml_workers.progress")

#: Shortest gap between two snapshot reads, in seconds (at most 4 updates a second).
MIN_INTERVAL_S = 0.25
#: How many running steps or busy workers a line names before "and N more".
NAMED = 3

#: Count labels in display order; ``ready`` steps count as ``pending`` (neither is on a queue).
_LABELS = (
    "completed",
    "cached",
    "running",
    "queued",
    "waiting",
    "pending",
    "failed",
    "skipped",
    "cancelled",
)
_LABEL_OF = {"ready": "pending"}
_FINISHED = frozenset({"completed", "cached", "failed", "skipped", "cancelled"})
_COLOURS = {
    "completed": "#2e7d32",
    "cached": "#00838f",
    "running": "#1565c0",
    "queued": "#6a1b9a",
    "waiting": "#6a1b9a",
    "failed": "#c62828",
    "skipped": "#8d6e63",
    "cancelled": "#8d6e63",
}


@dataclass(frozen=True)
class StepState:
    """One step of the run as the snapshot saw it; ``worker`` runs it (or ran it last)."""

    invocation_id: str
    status: str
    queue: str
    worker: str | None = None
    #: A ``waiting`` step's owner: (run id, invocation id) of the step computing its cache key.
    waits_for: tuple[str, str] | None = None


@dataclass(frozen=True)
class WorkerState:
    """A live worker: its node name, queues, pool slots (0: unknown) and the steps it runs."""

    name: str
    queues: tuple[str, ...]
    concurrency: int = 0
    running: tuple[tuple[str, str], ...] = ()  # (run id, invocation id)

    @property
    def busy(self) -> bool:
        """Whether it can take no further step (with unknown slots: runs at least one)."""
        return len(self.running) >= max(self.concurrency, 1)


@dataclass(frozen=True)
class Snapshot:
    """What one read of the metadata store says about a run.

    Attributes:
        workers: the live workers of the queues the run waits on; None on the embedded
            default, whose local processes keep no worker rows.
        local_workers: the embedded default's worker processes.
        window: the most steps of one run on the broker or running (``ZW_MAX_QUEUED_PER_RUN``).
        elapsed_s: seconds since the run was submitted.
    """

    run_id: str
    pipeline: str
    status: str
    steps: tuple[StepState, ...]
    elapsed_s: float | None = None
    workers: tuple[WorkerState, ...] | None = None
    local_workers: int = 0
    window: int = 0


# -- snapshot -> text -----------------------------------------------------------------------


def count_statuses(statuses: Iterable[str]) -> dict[str, int]:
    """Steps per label, in display order, only labels that occur."""
    counts = Counter(_LABEL_OF.get(s, s) for s in statuses)
    order = [label for label in _LABELS if counts[label]]
    order += sorted(set(counts) - set(_LABELS))  # a status added later still shows
    return {label: counts[label] for label in order}


def describe_counts(counts: dict[str, int]) -> str:
    """``"1 completed, 3 skipped"``."""
    return ", ".join(f"{n} {label}" for label, n in counts.items()) or "no steps"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def duration(seconds: float, *, whole: bool = False) -> str:
    """``"0.42s"``, ``"12.3s"``, ``"3m 05s"``, ``"1h 02m"`` (``whole``: no fractions)."""
    if seconds < 60:
        if whole:
            return f"{seconds:.0f}s"
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _named(items: Sequence[str]) -> str:
    shown = ", ".join(items[:NAMED])
    return shown if len(items) <= NAMED else f"{shown} and {len(items) - NAMED} more"


def _job(snapshot: Snapshot, run_id: str, invocation_id: str) -> str:
    if run_id == snapshot.run_id:
        return f"step {invocation_id} of this run"
    return f"run {run_id[:8]} step {invocation_id}"


def running_steps(snapshot: Snapshot) -> list[str]:
    """``"train on gpu@host1"`` for each running step."""
    return [
        f"{st.invocation_id} on {st.worker}" if st.worker else st.invocation_id
        for st in snapshot.steps
        if st.status == "running"
    ]


def wait_reasons(snapshot: Snapshot) -> list[str]:
    """Why queued and ready steps wait, one sentence per queue (and one for the run's window)."""
    queued: dict[str, int] = {}
    for st in snapshot.steps:
        if st.status == "queued":
            queued[st.queue] = queued.get(st.queue, 0) + 1
    reasons = []
    running = sum(1 for st in snapshot.steps if st.status == "running")
    if snapshot.workers is None:
        if queued:
            # The local processes serve every run this process submitted, not only this one.
            reasons.append(
                f"{_plural(sum(queued.values()), 'step')} waiting for a free local worker "
                f"process ({running} of {snapshot.local_workers} run steps of this run)"
            )
    else:
        for queue in sorted(queued):
            head = f"queue {queue!r}: {_plural(queued[queue], 'step')} waiting"
            reasons.append(f"{head}; {_consumers(snapshot, queue)}")
    for st in snapshot.steps:
        if st.status == "waiting" and st.waits_for is not None:
            reasons.append(
                f"step {st.invocation_id} waits for {_job(snapshot, *st.waits_for)} "
                "(same cache key): it reuses that step's outputs when it commits"
            )
    ready = sum(1 for st in snapshot.steps if st.status == "ready")
    in_flight = running + sum(queued.values())
    if ready and snapshot.window and in_flight >= snapshot.window:
        reasons.append(
            f"{_plural(ready, 'more step')} ready, held back while {in_flight} of this run's "
            f"steps are queued or running (at most {snapshot.window}: ZW_MAX_QUEUED_PER_RUN)"
        )
    return reasons


def _consumers(snapshot: Snapshot, queue: str) -> str:
    workers = [w for w in snapshot.workers or () if queue in w.queues]
    if not workers:
        return "no live worker consumes it"
    busy = [w for w in workers if w.busy]
    jobs = [_job(snapshot, rid, inv) for w in busy for rid, inv in w.running]
    noun = _plural(len(workers), f"{queue} worker")
    if len(busy) == len(workers):
        return f"{noun} busy with {_named(jobs)}"
    if not busy:
        return f"{noun}, none busy"
    return f"{noun}, {len(busy)} busy with {_named(jobs)}"


def headline(snapshot: Snapshot) -> str:
    """``"run 1a2b3c4d (training): 2/5 steps finished, 12s"``."""
    done = sum(1 for st in snapshot.steps if st.status in _FINISHED)
    line = f"run {snapshot.run_id[:8]} ({snapshot.pipeline}): {done}/{len(snapshot.steps)} steps finished"
    if snapshot.elapsed_s is not None:
        line += f", {duration(snapshot.elapsed_s, whole=True)}"
    return line


def render_lines(snapshot: Snapshot) -> list[str]:
    """The multi-line view: headline, counts, what runs where, why the rest waits."""
    lines = [
        headline(snapshot),
        describe_counts(count_statuses(st.status for st in snapshot.steps)),
    ]
    running = running_steps(snapshot)
    if running:
        lines.append(f"running: {_named(running)}")
    lines += [f"waiting: {reason}" for reason in wait_reasons(snapshot)]
    return lines


def render_line(snapshot: Snapshot) -> str:
    """The whole view on one line, for logs and pipes."""
    counts = describe_counts(count_statuses(st.status for st in snapshot.steps))
    parts = [f"{headline(snapshot)} ({counts})"]
    running = running_steps(snapshot)
    if running:
        parts.append(f"running {_named(running)}")
    parts += wait_reasons(snapshot)
    return "; ".join(parts)


def final_line(run_id: str, status: str, statuses: Iterable[str], duration_s: float | None) -> str:
    """``"run 1a2b3c4d failed after 3.2s; 4 steps: 1 completed, 1 failed, 2 skipped"``."""
    statuses = list(statuses)
    took = (
        ""
        if duration_s is None
        else f" {'in' if status == 'completed' else 'after'} {duration(duration_s)}"
    )
    counts = describe_counts(count_statuses(statuses))
    return f"run {run_id[:8]} {status}{took}; {_plural(len(statuses), 'step')}: {counts}"


# -- snapshot -> HTML -----------------------------------------------------------------------


def _counts_html(counts: dict[str, int]) -> str:
    return ", ".join(
        f'<span style="color:{_COLOURS.get(label, "inherit")}">{n} {html.escape(label)}</span>'
        for label, n in counts.items()
    )


def render_html(snapshot: Snapshot, *, warnings: Sequence[str] = ()) -> str:
    """The view as a small HTML block for a notebook cell."""
    total = len(snapshot.steps)
    done = sum(1 for st in snapshot.steps if st.status in _FINISHED)
    counts = count_statuses(st.status for st in snapshot.steps)
    rows = [
        f"<div><b>{html.escape(headline(snapshot))}</b></div>",
        f'<progress value="{done}" max="{max(total, 1)}" style="width:20em"></progress>',
        f"<div>{_counts_html(counts)}</div>",
    ]
    running = running_steps(snapshot)
    if running:
        rows.append(f"<div>running: {html.escape(_named(running))}</div>")
    rows += [
        f'<div style="color:#8a6d00">waiting: {html.escape(r)}</div>'
        for r in wait_reasons(snapshot)
    ]
    rows += [f'<div style="color:#b26b00">warning: {html.escape(w)}</div>' for w in warnings]
    return f'<div class="zw-progress" style="font-family:monospace">{"".join(rows)}</div>'


def final_html(line: str, *, warnings: Sequence[str] = ()) -> str:
    """The final line as HTML (what the notebook cell keeps once the run ended)."""
    rows = [f"<div><b>{html.escape(line)}</b></div>"]
    rows += [f'<div style="color:#b26b00">warning: {html.escape(w)}</div>' for w in warnings]
    return f'<div class="zw-progress" style="font-family:monospace">{"".join(rows)}</div>'


def run_summary(run: RunView) -> str:
    """A run in one line: ``RunView`` ``__repr__``."""
    counts = describe_counts(count_statuses(st.status for st in run.steps.values()))
    took = "" if run.duration_s is None else f", {duration(run.duration_s)}"
    return (
        f"<RunView {run.id} of {run.pipeline!r}: {run.status}, "
        f"{_plural(len(run.steps), 'step')} ({counts}){took}>"
    )


def run_summary_html(run: RunView) -> str:
    """A run as a small HTML table: ``RunView`` ``_repr_html_``."""
    counts = count_statuses(st.status for st in run.steps.values())
    took = "-" if run.duration_s is None else duration(run.duration_s)
    cells = [
        ("run", html.escape(run.id)),
        ("pipeline", html.escape(run.pipeline)),
        ("status", f'<span style="color:{_COLOURS.get(run.status, "inherit")}">'
         f"{html.escape(run.status)}</span>"),
        ("steps", f"{len(run.steps)}: {_counts_html(counts)}"),
        ("duration", took),
    ]  # fmt: skip
    body = "".join(
        f'<tr><th style="text-align:left">{k}</th><td style="text-align:left">{v}</td></tr>'
        for k, v in cells
    )
    return f'<table class="zw-run">{body}</table>'


# -- reading a snapshot ---------------------------------------------------------------------


def read_snapshot(stack: Stack, run_id: str, *, now: float | None = None) -> Snapshot:
    """One read of ``stack``'s metadata store: the run's steps and, on a cluster when some of
    them are queued, the live workers and what they run. Three statements at most, whatever
    the run's size.

    Raises:
        MetadataStoreError: the store cannot be read.
    """
    from sqlalchemy import select

    from stores.metadata import queries as q

    now = time.time() if now is None else now
    settings = stack.settings
    s_, r_ = q.STEPS.c, q.RUNS.c
    owner = q.STEPS.alias("owner")
    embedded = settings.is_embedded
    with stack.metadata.read() as s:
        rows = s.execute(
            select(
                r_.pipeline_name,
                r_.status.label("run_status"),
                r_.created_at,
                s_.invocation_id,
                s_.status,
                s_.queue,
                s_.worker_host,
                s_.worker_pid,
                owner.c.run_id.label("owner_run_id"),
                owner.c.invocation_id.label("owner_invocation_id"),
            )
            .join(q.RUNS, r_.id == s_.run_id)
            .outerjoin(owner, owner.c.id == s_.waits_for)
            .where(s_.run_id == run_id)
            .order_by(s_.position)
        ).all()
        workers: tuple[WorkerState, ...] | None = None
        if not embedded:
            workers = ()
            if any(r.status == "queued" for r in rows):
                workers = _read_workers(s, now=now, max_age_s=settings.worker_ttl_s)
    steps = tuple(
        StepState(
            r.invocation_id,
            r.status,
            r.queue,
            (f"local process {r.worker_pid}" if r.worker_pid else None)
            if embedded
            else r.worker_host,
            (r.owner_run_id, r.owner_invocation_id) if r.owner_run_id else None,
        )
        for r in rows
    )
    first = rows[0] if rows else None
    return Snapshot(
        run_id=run_id,
        pipeline=first.pipeline_name if first else "",
        status=first.run_status if first else "running",
        steps=steps,
        elapsed_s=max(0.0, now - first.created_at) if first else None,
        workers=workers,
        local_workers=settings.local_worker_count() if embedded else 0,
        window=settings.max_queued_per_run,
    )


def _read_workers(s: Any, *, now: float, max_age_s: float) -> tuple[WorkerState, ...]:
    from sqlalchemy import select

    from stores.metadata import queries as q
    from stores.metadata import workers as w

    live = w.live_workers(s, now=now, max_age_s=max_age_s)
    if not live:
        return ()
    c = q.STEPS.c
    running: dict[str, list[tuple[str, str]]] = {}
    for host, rid, inv in s.execute(
        select(c.worker_host, c.run_id, c.invocation_id)
        .where(c.status == "running", c.worker_host.in_([x.name for x in live]))
        .order_by(c.started_at)
    ):
        running.setdefault(host, []).append((rid, inv))
    return tuple(
        WorkerState(x.name, tuple(x.queues), x.concurrency, tuple(running.get(x.name, ())))
        for x in live
    )


# -- the reporter wait() uses ---------------------------------------------------------------


class ProgressReporter:
    """Shows a run's progress while ``wait()`` blocks; prints warnings (e.g. a queue with no
    worker) even when progress is off.

    Args:
        run_id: the run.
        enabled: show progress at all (``wait(progress=False)`` gives False).
        read: reads one :class:`Snapshot`; called at most once per ``min_interval_s``.
        display: where it goes (default: :func:`choose_display`, chosen on first use).
    """

    def __init__(
        self,
        run_id: str,
        *,
        enabled: bool,
        read: Callable[[], Snapshot] | None = None,
        display: Display | None = None,
        min_interval_s: float = MIN_INTERVAL_S,
    ) -> None:
        self.run_id = run_id
        self.enabled = enabled
        self._read = read
        self._display = display
        self._min_interval_s = min_interval_s
        self._last_read = float("-inf")

    @property
    def display(self) -> Display:
        if self._display is None:
            from zenml_workers.sdk.display import PlainDisplay, choose_display

            self._display = choose_display() if self.enabled else PlainDisplay(sys.stderr)
        return self._display

    def poll(self) -> None:
        """Read and show a snapshot, unless one was read less than ``min_interval_s`` ago.

        Raises:
            MetadataStoreError: the read failed (``wait()`` keeps waiting and says so).
        """
        if not self.enabled or self._read is None:
            return
        now = time.monotonic()
        if now - self._last_read < self._min_interval_s:
            return
        self._last_read = now
        from zenml_workers.errors import InfrastructureError

        try:
            self.update(self._read())
        except InfrastructureError:
            raise  # the store is away: wait() says so and keeps waiting
        except Exception:
            # The view is a convenience: it must not end a wait for a run that goes on.
            log.warning("progress display of run %s failed; hiding it", self.run_id, exc_info=True)
            self.close()
            self.enabled = False

    def update(self, snapshot: Snapshot) -> None:
        if self.enabled:
            self.display.show(snapshot)

    def warn(self, message: str) -> None:
        self.display.warn(message)

    def finish(self, run: RunView) -> None:
        """Show the final line: how the run ended and how many steps ended how."""
        if self.enabled:
            statuses = [st.status for st in run.steps.values()]
            self.display.finish(final_line(run.id, run.status, statuses, run.duration_s))

    def close(self) -> None:
        if self._display is not None:
            self._display.close()
