"""A minimal Celery app for testing the service fixtures without the project's worker.

The broker (and result backend) come from ``ZW_BROKER_URL``; creating the app connects to
nothing, so importing this module is cheap.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("noop_app", broker=os.environ["ZW_BROKER_URL"], backend=os.environ["ZW_BROKER_URL"])
app.conf.update(
    worker_send_task_events=True,
    task_send_sent_event=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="tests.noop")
def noop(value: int) -> int:
    """Return ``value`` unchanged."""
    return value
