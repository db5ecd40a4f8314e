"""Cancelling a run on the embedded default: queued steps never start, a running one is stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from stores.metadata.models import ArtifactRow
from tests.pipelines import cluster as pl
from tests.pipelines import fixtures
from tests.services.process import wait_until
from zenml_workers import Client, submit
from zenml_workers.errors import RunCancelledError
from zenml_workers.sdk.stack import get_stack
from zenml_workers.settings import Settings

local_stack = fixtures.local_stack


def test_embedded_cancel_stops_the_run_and_its_running_step(
    local_stack: Settings, tmp_path: Path
) -> None:
    handle = submit(pl.holding, marker_dir=str(tmp_path))
    wait_until(lambda: list(tmp_path.glob("pid-*")), 30, "the step to start")

    handle.cancel()
    # Nothing releases the step (it would hold for 120 s): the pool stops it inside its body.
    orchestrator = get_stack().orchestrator
    wait_until(lambda: orchestrator.idle(handle.id), 30, "the pool to stop the step")  # type: ignore[attr-defined]

    assert not list(tmp_path.glob("finished-*"))
    assert fixtures.artifact_files(local_stack) == []
    with pytest.raises(RunCancelledError):
        handle.wait(timeout_s=30)
    run = Client().get_run(handle.id)
    assert run.status == "cancelled"
    assert {k: s.status for k, s in run.steps.items()} == {
        "hold": "cancelled",
        "add_one": "cancelled",
    }
    assert run.steps["hold"].outputs == {}
    with get_stack().metadata.read() as s:
        assert s.execute(select(func.count()).select_from(ArtifactRow)).scalar_one() == 0
