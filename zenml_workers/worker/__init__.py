"""Celery worker entry point: ``celery -A zenml_workers.worker worker -Q cpu``.

``app`` is built on first access from the ``ZW_*`` settings, so importing this
package connects to nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name in ("app", "celery"):
        if _app is None:
            from zenml_workers.settings import load_settings
            from zenml_workers.worker.celery_app import create_app

            _app = create_app(load_settings())
        return _app
    raise AttributeError(f"module 'zenml_workers.worker' has no attribute {name!r}")
