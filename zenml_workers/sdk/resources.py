"""What a step asks of the machine it runs on, the queue that follows, and what it used.

Two spellings are accepted so both kinds of users feel at home:
``@step(resources=Resources(gpu=1))`` and ZenML's
``@step(settings={"resources": ResourceSettings(gpu_count=1)})``. Both resolve to
one :class:`Resources`, stored as JSON under ``StepSpec.settings["resources"]``.

What steps used is read back as :class:`StepCost` (``run.steps[...].cost``),
:class:`RunCost` (``run.cost``) and :class:`UsageRow` (``Client().usage()``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scheduler.specs import DEFAULT_QUEUE, GPU_QUEUE, canonical_json

if TYPE_CHECKING:
    from stores.metadata.usage import UsageRecord, UsageTotals

__all__ = [
    "ResourceSettings",
    "Resources",
    "RunCost",
    "StepCost",
    "UsageRow",
    "resolve_queue",
    "resolve_resources",
    "settings_to_json",
]

#: The settings key that holds resources, as in ZenML.
RESOURCES_KEY = "resources"


@dataclass(frozen=True)
class Resources:
    """Resources one step invocation needs.

    Attributes:
        cpu: CPU cores (fractions allowed), or None for the worker's default.
        gpu: number of GPUs; any value above 0 routes the step to the ``gpu`` queue.
        memory: memory as text with a unit, e.g. ``"4GB"``, or None.
    """

    cpu: float | None = None
    gpu: int = 0
    memory: str | None = None


@dataclass(frozen=True)
class ResourceSettings:
    """ZenML's spelling of :class:`Resources`, for ``settings={"resources": ...}``."""

    cpu_count: float | None = None
    gpu_count: int = 0
    memory: str | None = None


def _from_mapping(d: dict[str, Any]) -> Resources:
    return Resources(
        cpu=d.get("cpu", d.get("cpu_count")),
        gpu=int(d.get("gpu", d.get("gpu_count", 0)) or 0),
        memory=d.get("memory"),
    )


def _as_resources(value: Any) -> Resources | None:
    if value is None:
        return None
    if isinstance(value, Resources):
        return value
    if isinstance(value, ResourceSettings):
        return Resources(cpu=value.cpu_count, gpu=value.gpu_count, memory=value.memory)
    if isinstance(value, dict):
        return _from_mapping(value)
    raise TypeError(
        f"resources must be Resources(...), ResourceSettings(...) or a dict, not "
        f"{type(value).__name__}; wrap the values in Resources(cpu=..., gpu=..., memory=...)"
    )


def resolve_resources(
    resources: Resources | None, settings: dict[str, Any] | None
) -> Resources | None:
    """Merge ``resources=`` with ``settings["resources"]``; ``resources=`` wins field by field.

    Raises:
        TypeError: when either is of an unsupported type.
    """
    from_settings = _as_resources((settings or {}).get(RESOURCES_KEY))
    explicit = _as_resources(resources)
    if explicit is None:
        return from_settings
    if from_settings is None:
        return explicit
    defaults = Resources()
    return Resources(
        cpu=explicit.cpu if explicit.cpu != defaults.cpu else from_settings.cpu,
        gpu=explicit.gpu if explicit.gpu != defaults.gpu else from_settings.gpu,
        memory=explicit.memory if explicit.memory != defaults.memory else from_settings.memory,
    )


def resolve_queue(
    step_type: str,
    queue: str | None,
    resources: Resources | None,
    settings: dict[str, Any] | None = None,
) -> str:
    """The queue a step goes to: ``queue=`` if given, ``gpu`` for trainers and GPU asks, else ``cpu``.

    Raises:
        TypeError: when the resources are of an unsupported type.
    """
    if queue:
        return queue
    if step_type == "trainer":
        return GPU_QUEUE
    resolved = resolve_resources(resources, settings)
    if resolved is not None and resolved.gpu > 0:
        return GPU_QUEUE
    return DEFAULT_QUEUE


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if hasattr(value, "model_dump") and not isinstance(value, type):
        return _jsonable(value.model_dump())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def settings_to_json(
    settings: dict[str, Any] | None, resources: Resources | None = None
) -> dict[str, Any]:
    """Settings as plain JSON (dataclasses and pydantic models become dicts).

    The merged resources, when there are any, replace ``settings["resources"]``
    as a :class:`Resources` dict, so readers of the spec see one spelling.

    Raises:
        TypeError: when a value is not JSON-serialisable after conversion.
        ValueError: likewise, for values JSON rejects (e.g. circular containers).
    """
    out = _jsonable(dict(settings or {}))
    resolved = resolve_resources(resources, settings)
    if resolved is not None:
        out[RESOURCES_KEY] = dataclasses.asdict(resolved)
    else:
        out.pop(RESOURCES_KEY, None)
    # Normalise through JSON so the spec equals its own decode.
    result: dict[str, Any] = json.loads(canonical_json(out))
    return result


# -- what steps used ------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """What one step invocation cost, from its records; times in seconds.

    Only the step's own call is measured (not loading inputs or storing outputs). CPU time is
    user + system time of its worker process; GPU-seconds are the GPUs the attempt held
    (``CUDA_VISIBLE_DEVICES`` of its worker, for steps asking for a GPU) times its wall time.

    Attributes:
        wall_s, cpu_s, gpu_s: the final measured attempt.
        gpus: the GPU ids that attempt held (``()`` for none).
        attempts: attempts measured (one whose worker process died records nothing).
        total_wall_s, total_cpu_s, total_gpu_s: every measured attempt, failed ones included:
            what the step cost.
        saved_wall_s, saved_cpu_s, saved_gpu_s: for a cache hit, what its original's final
            attempt cost, which this run did not spend; 0 otherwise.
        measured: whether any cost was recorded (False for steps that never ran, hits on a
            step run recorded before costs were, and steps that ran elsewhere unmeasured).
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    gpus: tuple[str, ...] = ()
    attempts: int = 0
    total_wall_s: float = 0.0
    total_cpu_s: float = 0.0
    total_gpu_s: float = 0.0
    saved_wall_s: float = 0.0
    saved_cpu_s: float = 0.0
    saved_gpu_s: float = 0.0
    measured: bool = False

    @classmethod
    def from_records(cls, own: UsageRecord | None, original: UsageRecord | None = None) -> StepCost:
        """The cost of a step with record ``own``; ``original``: a cache hit's original's."""
        cost = cls()
        if own is not None:
            cost = dataclasses.replace(
                cost,
                wall_s=own.wall_s,
                cpu_s=own.cpu_s,
                gpu_s=own.gpu_s,
                gpus=own.gpus,
                attempts=own.attempts,
                total_wall_s=own.total_wall_s,
                total_cpu_s=own.total_cpu_s,
                total_gpu_s=own.total_gpu_s,
                measured=True,
            )
        if original is not None:
            cost = dataclasses.replace(
                cost,
                saved_wall_s=original.wall_s,
                saved_cpu_s=original.cpu_s,
                saved_gpu_s=original.gpu_s,
                measured=True,
            )
        return cost


@dataclass(frozen=True)
class RunCost:
    """What a run cost: the sums of its steps' :class:`StepCost` totals, in seconds.

    ``wall_s``, ``cpu_s`` and ``gpu_s`` include failed attempts; ``saved_*`` are what its cache
    hits did not spend (their originals' final attempts).
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    saved_wall_s: float = 0.0
    saved_cpu_s: float = 0.0
    saved_gpu_s: float = 0.0

    @classmethod
    def of(cls, steps: Iterable[StepCost]) -> RunCost:
        from stores.metadata.usage import seconds

        costs = list(steps)
        return cls(
            wall_s=seconds(sum(c.total_wall_s for c in costs)),
            cpu_s=seconds(sum(c.total_cpu_s for c in costs)),
            gpu_s=seconds(sum(c.total_gpu_s for c in costs)),
            saved_wall_s=seconds(sum(c.saved_wall_s for c in costs)),
            saved_cpu_s=seconds(sum(c.saved_cpu_s for c in costs)),
            saved_gpu_s=seconds(sum(c.saved_gpu_s for c in costs)),
        )


@dataclass(frozen=True)
class UsageRow:
    """One group (a user, a pipeline or a run) of :meth:`Client.usage`; times in seconds.

    Attributes:
        key: the user, the pipeline name or the run id.
        runs: runs with a step counted in the period.
        steps: step runs that ran at least one attempt; cached_steps: cache hits.
        wall_s, cpu_s, gpu_s: every measured attempt, failed ones included.
        saved_wall_s, saved_cpu_s, saved_gpu_s: what the cache hits did not spend, credited
            to the run (and user) that reused the outputs.
        pipeline, user: the run's pipeline and user where the grouping fixes them, else None.
    """

    key: str
    runs: int
    steps: int
    cached_steps: int
    wall_s: float
    cpu_s: float
    gpu_s: float
    saved_wall_s: float
    saved_cpu_s: float
    saved_gpu_s: float
    pipeline: str | None = None
    user: str | None = None

    @classmethod
    def from_totals(cls, t: UsageTotals) -> UsageRow:
        return cls(**{f.name: getattr(t, f.name) for f in dataclasses.fields(cls)})
