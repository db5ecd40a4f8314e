"""The raw-Celery baseline: one ``noop`` task, Redis as broker and result backend.

Workers start it with ``celery -A bench.noop_app worker -Q bench-noop``; the broker
URL comes from ``BENCH_BROKER_URL``. The bench process builds its own client with
:func:`make_app`. Creating an app connects to nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["NOOP_QUEUE", "NOOP_TASK", "make_app"]

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench-noop"


def make_app(broker_url: str) -> Celery:
    """A Celery app with plain defaults (JSON, Redis results) and the ``noop`` task."""
    from celery import Celery

    app = Celery("bench_noop", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_default_queue=NOOP_QUEUE,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    # Not shared: each app (the worker's, the bench's client) registers its own copy.
    @app.task(name=NOOP_TASK, shared=False)
    def noop(value: int) -> int:
        return value

    return app


app = make_app(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
