"""Which flavors of optional stack components exist, and building the configured ones.

The client's settings say which components its stack has (``ZW_MLFLOW_TRACKING_URI``...);
:func:`component_records` turns them into the records a run carries in
``runs.config["stack"]`` (the stack is the client's, as in ZenML: a worker serves every
team member's stack); a worker builds the components from that record with
:func:`components_from_stack`, once per distinct record and process.

Flavors are imported by name only when built, so nothing here imports a client library.
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from zenml_workers.components.base import ComponentKind, StackComponent
from zenml_workers.errors import ConfigurationError

if TYPE_CHECKING:
    from zenml_workers.settings import Settings

__all__ = [
    "FLAVORS",
    "component_records",
    "components_for",
    "components_from_stack",
    "register_flavor",
]

#: ``(kind, flavor) -> "module:Class"`` of every known component flavor.
FLAVORS: dict[tuple[ComponentKind, str], str] = {
    (ComponentKind.EXPERIMENT_TRACKER, "mlflow"): (
        "zenml_workers.components.mlflow_tracker:MLflowExperimentTracker"
    ),
}

_BUILT: OrderedDict[str, StackComponent] = OrderedDict()
_BUILT_MAX = 32


def register_flavor(cls: type[StackComponent]) -> type[StackComponent]:
    """Make ``cls`` (a :class:`StackComponent` subclass with ``kind`` and ``flavor``) known
    in this process; usable as a class decorator. Workers must register it too."""
    FLAVORS[(ComponentKind(cls.kind), cls.flavor)] = f"{cls.__module__}:{cls.__qualname__}"
    return cls


def component_records(settings: Settings) -> dict[str, dict[str, Any]]:
    """The optional components of ``settings``' stack, as a run records them: ``{kind:
    {"flavor": ..., setting: value}}``; empty when the stack has none. No secrets: a tracking
    URI with a password in it is refused (MLflow takes credentials from the worker's
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN``).

    Raises:
        ConfigurationError: a component's setting is invalid.
    """
    records: dict[str, dict[str, Any]] = {}
    uri = settings.mlflow_tracking_uri
    if uri:
        _check_no_password(uri)
        records[ComponentKind.EXPERIMENT_TRACKER.value] = {
            "flavor": "mlflow",
            "tracking_uri": uri,
            "experiment_name": settings.mlflow_experiment_name,
        }
    return records


def components_for(settings: Settings) -> tuple[StackComponent, ...]:
    """The optional components configured on ``settings``' stack, built (none: ``()``).

    Raises:
        ConfigurationError: a component's setting is invalid, or its flavor is unknown.
    """
    return components_from_stack(component_records(settings))


def components_from_stack(stack: Mapping[str, Any]) -> tuple[StackComponent, ...]:
    """The components named in a recorded stack (``runs.config["stack"]``; its other keys,
    the core components, are ignored), built once per distinct record in this process.

    Raises:
        ConfigurationError: a record names an unknown flavor or is invalid.
    """
    out: list[StackComponent] = []
    for kind in ComponentKind:
        record = stack.get(kind.value)
        if not record:
            continue
        key = json.dumps([kind.value, record], sort_keys=True, default=str)
        component = _BUILT.get(key)
        if component is None:
            component = _flavor_class(kind, str(record.get("flavor", ""))).from_config(record)
            _BUILT[key] = component
            if len(_BUILT) > _BUILT_MAX:
                _BUILT.popitem(last=False)
        out.append(component)
    return tuple(out)


def _flavor_class(kind: ComponentKind, flavor: str) -> type[StackComponent]:
    path = FLAVORS.get((kind, flavor))
    if path is None:
        known = sorted(f for k, f in FLAVORS if k is kind) or ["none yet"]
        raise ConfigurationError(
            f"the stack's {kind.value.replace('_', ' ')} has flavor {flavor!r}, which this "
            f"process does not know (known: {', '.join(known)}); fix the stack or register the "
            "flavor with zenml_workers.components.registry.register_flavor on the workers too"
        )
    module, _, name = path.partition(":")
    cls: type[StackComponent] = getattr(importlib.import_module(module), name)
    return cls


def _check_no_password(uri: str) -> None:
    from urllib.parse import urlsplit

    try:
        password = urlsplit(uri).password
    except ValueError:
        password = None
    if password:
        raise ConfigurationError(
            "ZW_MLFLOW_TRACKING_URI holds a password, which would be recorded on every run; "
            "remove it from the URI and give each worker MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
        )
