"""The raw-Celery baseline for a killed pool child: one ``hold`` task with late acks.

``celery -A bench.raw_hold_app worker -Q bench-hold``; the broker URL comes from
``BENCH_BROKER_URL``. The task writes ``pid-<pid>`` into its folder and blocks until
``release`` exists there, so the bench can SIGKILL the child running it and time
how soon Celery runs it again (``acks_late`` + ``reject_on_worker_lost``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["HOLD_QUEUE", "make_app"]

HOLD_QUEUE = "bench-hold"


def make_app(broker_url: str) -> Celery:
    """A Celery app with the crash-safe delivery settings and the ``hold`` task."""
    from celery import Celery

    app = Celery("bench_hold", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=HOLD_QUEUE,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="bench.hold", shared=False)
    def hold(folder: str) -> None:
        d = Path(folder)
        (d / f"pid-{os.getpid()}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not (d / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    return app


app = make_app(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
