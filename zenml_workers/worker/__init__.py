"""Celery worker entry point: ``celery -A zenml_workers.worker worker -Q cpu``.

``app`` is built on first access from the ``ZW_*`` settings, so importing this
package connects to nothing. Without a broker (``ZW_BROKER_URL`` unset) there is no
app to build: Celery's default would retry AMQP on localhost for ever.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["NO_BROKER", "app"]

#: Why there is no app without ``ZW_BROKER_URL``, and what to do.
NO_BROKER = (
    "no broker configured: set ZW_BROKER_URL (e.g. redis://localhost:6379/0) for "
    "`celery -A zenml_workers.worker`; the embedded default needs no worker"
)

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = _build()
        return _app
    raise AttributeError(f"module 'zenml_workers.worker' has no attribute {name!r}")


def _build() -> Any:
    """The app for the ``ZW_*`` settings.

    Raises:
        ConfigurationError: no broker is configured (``ZW_BROKER_URL`` unset or empty).
        SystemExit: the same, inside the ``celery`` program, which would print the
            exception with a traceback of its own loader: there, one sentence is the answer.
    """
    from zenml_workers.errors import ConfigurationError
    from zenml_workers.settings import load_settings
    from zenml_workers.worker.celery_app import create_app

    # As `zw` does (zenml_workers.cli.base.quiet_libraries): no Alembic INFO lines per start.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = load_settings()
    if settings.is_embedded:
        if "celery.bin.celery" in sys.modules:
            raise SystemExit(f"error: {NO_BROKER}")
        raise ConfigurationError(NO_BROKER)
    return create_app(settings)
