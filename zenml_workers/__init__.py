"""zenml-workers: ZenML-style pipelines executed on Celery workers.

The public API is ``__all__``. Heavy modules (SQLAlchemy, Celery, pydantic)
load on first use, so ``import zenml_workers`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Materializer",
    "ResourceSettings",
    "Resources",
    "RunHandle",
    "Settings",
    "StepContext",
    "get_step_context",
    "load_settings",
    "pipeline",
    "register_materializer",
    "step",
    "submit",
    "trainer",
]

_LAZY = {
    "step": "zenml_workers.sdk.step",
    "trainer": "zenml_workers.sdk.step",
    "pipeline": "zenml_workers.sdk.pipeline",
    "Resources": "zenml_workers.sdk.resources",
    "ResourceSettings": "zenml_workers.sdk.resources",
    "submit": "zenml_workers.sdk.runner",
    "RunHandle": "zenml_workers.sdk.runner",
    "Client": "zenml_workers.sdk.client",
    "Materializer": "zenml_workers.sdk.materializers.base",
    "register_materializer": "zenml_workers.sdk.materializers.registry",
    "Settings": "zenml_workers.settings",
    "load_settings": "zenml_workers.settings",
    "StepContext": "zenml_workers.sdk.step_context",
    "get_step_context": "zenml_workers.sdk.step_context",
}

if TYPE_CHECKING:
    from zenml_workers.sdk.client import Client
    from zenml_workers.sdk.materializers.base import Materializer
    from zenml_workers.sdk.materializers.registry import register_materializer
    from zenml_workers.sdk.pipeline import pipeline
    from zenml_workers.sdk.resources import Resources, ResourceSettings
    from zenml_workers.sdk.runner import RunHandle, submit
    from zenml_workers.sdk.step import step, trainer
    from zenml_workers.sdk.step_context import StepContext, get_step_context
    from zenml_workers.settings import Settings, load_settings


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zenml_workers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
