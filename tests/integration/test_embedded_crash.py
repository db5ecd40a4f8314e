"""A local worker process that dies mid-step fails its run clearly; the next run gets a new pool."""

from __future__ import annotations

import pytest

from tests.pipelines import crashing, fixtures
from zenml_workers import Client
from zenml_workers.errors import RunFailedError
from zenml_workers.settings import Settings

local_stack = fixtures.local_stack


def test_embedded_worker_death_fails_the_run_and_the_pool_recovers(local_stack: Settings) -> None:
    with pytest.raises(RunFailedError, match="local worker process .* died") as info:
        crashing.crashing(x=3)

    run = Client().get_run(info.value.run_id)
    assert run.status == "failed"
    assert run.steps["passthrough"].status == "skipped"
    assert run.steps["die"].status == "failed"
    assert "WorkerLostError" in run.steps["die"].exception
    assert crashing.healthy(x=4).steps["passthrough"].output.load() == 4
