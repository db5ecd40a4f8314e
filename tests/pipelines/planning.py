"""Plan a run straight into a metadata store, as ``submit()`` would, for tests that need
rows (queued steps, a claimable attempt) without a client or workers."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from scheduler import dispatch
from scheduler.specs import PipelineSpec
from stores.metadata.store import MetadataStore


def plan(
    store: MetadataStore,
    spec: PipelineSpec,
    *,
    now: float,
    window: int = dispatch.DEFAULT_WINDOW,
    run_id: str | None = None,
    code_blobs: Sequence[dict[str, Any]] = (),
    orchestrator: str = "celery",
) -> list[dispatch.QueuedStep]:
    """Record a run of ``spec`` (by user ``u``, named after its id) and return its first tasks."""
    run_id = run_id or str(uuid.uuid4())
    with store.transaction() as s:
        return dispatch.plan_run(
            s,
            spec=spec,
            code_blobs=list(code_blobs),
            run_id=run_id,
            run_name=run_id,
            config={},
            environment={},
            user="u",
            orchestrator=orchestrator,
            window=window,
            now=now,
        )
