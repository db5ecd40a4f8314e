"""The team fixture itself: a teammate's process runs a pipeline on the shared services."""

from __future__ import annotations

import pytest

from tests.team.conftest import Team

pytestmark = pytest.mark.services


def test_a_teammate_runs_a_pipeline_on_the_shared_services(team: Team) -> None:
    proc = team.run_as(
        "alice",
        """
        import json
        from tests.pipelines import cluster as pl
        from zenml_workers import submit
        run = submit(pl.routed, x=3).wait(timeout_s=60, progress=False)
        print(json.dumps({"status": run.status, "user": run.user, "fit": run.steps["fit"].worker_host}))
        """,
    )
    assert team.last_json(proc) == {"status": "completed", "user": "alice", "fit": "gpu@team"}
