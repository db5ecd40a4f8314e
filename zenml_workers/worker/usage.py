"""Measure what one step attempt costs: wall time, CPU time and the GPUs it held.

What is measured is the step's own call (``fn(**kwargs)``), not loading its inputs or
storing its outputs (those are in ``duration_s``):

- wall time: ``time.perf_counter()`` around the call;
- CPU time: the ``resource.getrusage`` deltas of user + system time of the worker process
  (all its threads) plus the child processes the step started and waited for. When
  another step ran in the same process meanwhile (a ``threads`` pool), a process delta
  would count both, so such a step gets its own thread's delta instead (``cpu_scope``
  ``thread``): a lower bound, as threads the step started are then not counted;
- GPUs: the ids in the worker process's ``CUDA_VISIBLE_DEVICES`` (``zw worker --queues gpu
  --concurrency N`` gives each of its processes one), for a step that asks for a GPU (the
  ``gpu`` queue, ``@trainer``, ``Resources(gpu=...)``); other steps hold none. GPU-seconds
  are GPUs x wall time.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from scheduler.specs import GPU_QUEUE, StepSpec
from stores.metadata.usage import USAGE_KEY, UsageRecord

_THREAD = getattr(resource, "RUSAGE_THREAD", None)  # Linux only


def visible_gpus(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """GPU ids in ``CUDA_VISIBLE_DEVICES``, read as CUDA does: up to the first invalid entry
    (``-1`` hides every GPU), duplicates once; unset or empty means none."""
    raw = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "")
    found: list[str] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        if entry not in found:
            found.append(entry)
    return tuple(found)


def asks_for_gpu(step: StepSpec) -> bool:
    """Whether ``step`` holds its worker's GPUs: a gpu-queue step, a trainer or a GPU ask."""
    resources = step.settings.get("resources") or {}
    gpu = resources.get("gpu", resources.get("gpu_count", 0)) if isinstance(resources, dict) else 0
    return step.queue == GPU_QUEUE or step.step_type == "trainer" or bool(gpu)


class _Overlaps:
    """Which measurements of this process overlapped another one (a ``threads`` pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, bool] = {}
        self._next = 0

    def reset(self) -> None:
        """Start empty in a forked child: the parent's measurements are not its own."""
        self._lock = threading.Lock()
        self._active = {}

    def enter(self) -> int:
        with self._lock:
            token, self._next = self._next, self._next + 1
            for other in self._active:
                self._active[other] = True
            self._active[token] = bool(self._active)
            return token

    def leave(self, token: int) -> bool:
        """Forget ``token``; True when another measurement ran while it did."""
        with self._lock:
            return self._active.pop(token)


_OVERLAPS = _Overlaps()
os.register_at_fork(after_in_child=_OVERLAPS.reset)


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class StepMeter:
    """Measures one attempt's step call; :meth:`record` turns it into step metadata.

    Args:
        gpus: the GPU ids the attempt holds (see :func:`visible_gpus`).
    """

    def __init__(self, gpus: tuple[str, ...] = ()) -> None:
        self.gpus = gpus
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.cpu_scope = "process"

    @classmethod
    def for_step(cls, step: StepSpec) -> StepMeter:
        return cls(visible_gpus() if asks_for_gpu(step) else ())

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Measure the block (it may raise: a failed call costs as much as it ran)."""
        token = _OVERLAPS.enter()
        wall = time.perf_counter()
        process = _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN)
        thread = _cpu_s(_THREAD) if _THREAD is not None else 0.0
        try:
            yield
        finally:
            self.wall_s += time.perf_counter() - wall
            if _OVERLAPS.leave(token) and _THREAD is not None:
                self.cpu_s += _cpu_s(_THREAD) - thread
                self.cpu_scope = "thread"
            else:
                now = _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN)
                self.cpu_s += now - process

    def record(self, earlier: Mapping[str, Any] | None) -> UsageRecord:
        """This attempt added to the record of the earlier attempts found in ``earlier`` (the
        step metadata of the claimed row, which the earlier attempts wrote)."""
        before = UsageRecord.of(earlier) or UsageRecord()
        return before.then(
            wall_s=self.wall_s, cpu_s=self.cpu_s, gpus=self.gpus, cpu_scope=self.cpu_scope
        )

    def add_to(self, values: dict[str, Any], *, earlier: Mapping[str, Any] | None) -> None:
        """Put :meth:`record` into the step-run ``values`` under ``step_metadata["usage"]``."""
        metadata = dict(values.get("step_metadata") or {})
        metadata[USAGE_KEY] = self.record(earlier).encode()
        values["step_metadata"] = metadata
