"""What a step asks of the machine it runs on, and the queue that follows from it.

Two spellings are accepted so both kinds of users feel at home:
``@step(resources=Resources(gpu=1))`` and ZenML's
``@step(settings={"resources": ResourceSettings(gpu_count=1)})``. Both resolve to
one :class:`Resources`, stored as JSON under ``StepSpec.settings["resources"]``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from scheduler.specs import DEFAULT_QUEUE, GPU_QUEUE, canonical_json

__all__ = [
    "ResourceSettings",
    "Resources",
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
