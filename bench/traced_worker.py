"""Our Celery worker app with timestamps around each phase of a step, for ``--only profile``.

Start it like the real one (``celery -A bench.traced_worker worker -Q cpu``). Before
the app is built, it wraps a few functions of the project (in this process only,
nothing is changed on disk) so that every step attempt appends one JSON line per
phase boundary to ``$BENCH_TRACE_DIR/<pid>.jsonl``:

    task_start / task_end     the Celery task body (zw.step), in the pool process
    claim_start / claim_end   the claim UPDATE inside the first transaction
    succeeded_start / _end    outcomes.step_succeeded (the commit's statements, before COMMIT)
    execute_end               execute_step returned (COMMIT done)
    send_start / send_end     publishing the follow-up step tasks
    publish_end               the run event published on Redis pub/sub
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["app"]

_FILES: dict[int, Any] = {}


def _emit(event: str, **fields: Any) -> None:
    pid = os.getpid()
    out = _FILES.get(pid)
    if out is None:
        folder = Path(os.environ.get("BENCH_TRACE_DIR", "/tmp/zw-bench-trace"))
        folder.mkdir(parents=True, exist_ok=True)
        out = _FILES[pid] = open(folder / f"{pid}.jsonl", "a", buffering=1)  # noqa: SIM115 - kept open
    out.write(json.dumps({"t": time.time(), "pid": pid, "event": event, **fields}) + "\n")


def _traced(
    fn: Callable[..., Any], start: str, end: str, key: Callable[..., dict[str, Any]]
) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ids = key(*args, **kwargs)
        _emit(start, **ids)
        try:
            return fn(*args, **kwargs)
        finally:
            _emit(end, **ids)

    return wrapper


def _install() -> Any:
    import importlib

    from scheduler import outcomes
    from stores.metadata import attempts
    from zenml_workers.settings import load_settings
    from zenml_workers.worker import execute

    # Not `from zenml_workers.worker import app`: the package's lazy `app` attribute would
    # build a second Celery app whose (shared) zw.step task would shadow the traced one.
    app_module = importlib.import_module("zenml_workers.worker.celery_app")

    def claim_ids(_s: Any, step_run_id: str, **__: Any) -> dict[str, Any]:
        return {"step_run_id": step_run_id}

    def row_ids(_s: Any, row: Any, **__: Any) -> dict[str, Any]:
        return {"run": row.run_id, "step": row.invocation_id}

    def send_ids(_app: Any, queued: Any) -> dict[str, Any]:
        return {"steps": [q_.task.invocation_id for q_ in queued]}

    inner_execute = execute.execute_step

    def execute_step(task: Any, ctx: Any) -> Any:
        _emit("task_start", run=task.run_id, step=task.invocation_id)
        try:
            return inner_execute(task, ctx)
        finally:
            _emit("execute_end", run=task.run_id, step=task.invocation_id)

    execute.execute_step = execute_step
    # Each wrap is skipped if the project renamed the function; the profile then lacks that phase.
    if hasattr(attempts, "claim"):
        attempts.claim = _traced(attempts.claim, "claim_start", "claim_end", claim_ids)
    if hasattr(outcomes, "step_succeeded"):
        outcomes.step_succeeded = _traced(
            outcomes.step_succeeded, "succeeded_start", "succeeded_end", row_ids
        )
    app_module.send_steps = _traced(app_module.send_steps, "send_start", "send_end", send_ids)
    publish = app_module.RunEvents.publish_idle

    @functools.wraps(publish)
    def traced_publish(self: Any, run_id: str, *, step: str) -> None:
        publish(self, run_id, step=step)
        _emit("publish_end", run=run_id, step=step)

    app_module.RunEvents.publish_idle = traced_publish  # type: ignore[method-assign]
    return app_module.create_app(load_settings())


app = _install()
