"""Real runs on the embedded default: local worker processes, SQLite and a local artifact folder.

No servers. Each test gets a fresh ``ZW_HOME`` (see ``tests.pipelines.fixtures``).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from tests.pipelines import basic, chatty, fixtures, ml
from tests.pipelines.fixtures import artifact_files, file_sha256
from zenml_workers import Client, submit
from zenml_workers.errors import NotFoundError
from zenml_workers.sdk.client import RunView
from zenml_workers.settings import Settings

#: The embedded-default stack fixture, used by name as a test argument.
local_stack = fixtures.local_stack

RUN_TIMEOUT_S = 90.0


def _statuses(run: RunView) -> dict[str, str]:
    return {inv: st.status for inv, st in run.steps.items()}


def test_embedded_chain_runs_every_step_in_order(local_stack: Settings) -> None:
    run = basic.chain(n=3)

    assert run.status == "completed"
    assert list(run.steps) == ["source", "add", "multiply"]
    assert _statuses(run) == {"source": "completed", "add": "completed", "multiply": "completed"}
    assert run.steps["source"].output.load() == 3
    assert run.steps["add"].outputs["sum"].load() == 4
    assert run.steps["multiply"].outputs["product"].load() == 8
    assert run.orchestrator == "local"
    add, mult = run.steps["add"], run.steps["multiply"]
    assert add.ended_at is not None and mult.started_at is not None
    assert add.ended_at <= mult.started_at
    assert all(st.attempt == 1 and st.worker_pid for st in run.steps.values())


def test_embedded_diamond_joins_both_branches(local_stack: Settings) -> None:
    run = basic.diamond(n=5)

    assert run.status == "completed"
    assert run.steps["add"].output.load() == 6
    assert run.steps["multiply"].output.load() == 10
    assert run.steps["combine"].outputs["total"].load() == 16


def test_embedded_fan_out_fan_in_of_50_passes_a_list_in_order(local_stack: Settings) -> None:
    run = basic.fan_out_fan_in(seed=7, width=50)

    assert run.status == "completed"
    work_ids = ["work"] + [f"work_{i}" for i in range(2, 51)]
    assert [inv for inv in run.steps if inv.startswith("work")] == work_ids
    assert all(run.steps[inv].status == "completed" for inv in work_ids)
    parts = run.steps["join"].inputs["parts"]
    assert isinstance(parts, list)
    assert [p.load() for p in parts] == [7000 + i for i in range(50)]
    assert [p.id for p in parts] == [run.steps[inv].output.id for inv in work_ids]
    assert run.steps["join"].output.load() == sum(7000 + i for i in range(50))


def test_embedded_multi_output_step_feeds_two_consumers(local_stack: Settings) -> None:
    run = basic.multi_output(n=10)

    assert run.status == "completed"
    split = run.steps["split"]
    assert set(split.outputs) == {"train", "test"}
    assert split.outputs["train"].load() == list(range(8))
    assert split.outputs["test"].load() == [8, 9]
    with pytest.raises(ValueError, match="outputs"):
        _ = split.output
    # The same step called twice gets invocation ids name, name_2.
    assert run.steps["size"].output.load() == 8
    assert run.steps["size_2"].output.load() == 2
    assert run.steps["size"].name == run.steps["size_2"].name == "size"
    assert run.steps["size"].inputs["values"].id == split.outputs["train"].id
    assert run.steps["size_2"].inputs["values"].id == split.outputs["test"].id


def test_client_get_pipeline_last_run_is_the_newest(local_stack: Settings) -> None:
    first = basic.chain(n=1)
    second = basic.chain(n=2)

    pipeline = Client().get_pipeline("chain")
    assert pipeline.name == "chain"
    assert pipeline.last_run.id == second.id
    assert [r.id for r in pipeline.runs] == [second.id, first.id]
    assert Client().get_run(first.id[:12]).id == first.id
    assert "chain" in Client().list_pipelines()
    with pytest.raises(NotFoundError):
        Client().get_run("no-such-run")


def test_submit_returns_a_handle_whose_wait_returns_the_run(local_stack: Settings) -> None:
    handle = submit(basic.diamond, n=2)

    assert isinstance(handle.id, str) and handle.id
    # submit() returns before the run ends; the run is recorded already.
    assert handle.status in {"running", "completed"}
    assert Client().get_run(handle.id).pipeline == "diamond"
    run = handle.wait(timeout_s=RUN_TIMEOUT_S)
    assert run.id == handle.id
    assert run.status == "completed"
    assert handle.status == "completed"
    assert handle.progress() == (4, 4)
    assert run.steps["combine"].output.load() == 3 + 4


def test_step_logs_capture_print_and_logging(local_stack: Settings) -> None:
    run = chatty.chatty_pipeline(n=7)

    logs = run.steps["chatty"].logs
    assert "chatty stdout line n=7" in logs
    assert "chatty stderr line n=7" in logs
    assert "chatty info record n=7" in logs
    assert "chatty warning record n=7" in logs
    assert Client().logs(run.id, "chatty") == logs


def test_lineage_inputs_point_at_producer_artifacts(local_stack: Settings) -> None:
    run = basic.chain(n=3)

    source, add, mult = run.steps["source"], run.steps["add"], run.steps["multiply"]
    assert add.inputs["x"].id == source.outputs["value"].id
    assert mult.inputs["x"].id == add.outputs["sum"].id
    assert source.inputs == {}
    produced = add.outputs["sum"]
    assert produced.producer_run_id == run.id
    assert produced.producer_step_run_id == add.id
    assert Client().get_artifact(produced.id).uri == produced.uri


def test_artifact_content_hash_is_sha256_of_stored_bytes(local_stack: Settings) -> None:
    run = ml.tabular(rows=12)

    artifacts = [a for st in run.steps.values() for a in st.outputs.values()]
    assert len(artifacts) == 4
    stored = {str(p) for p in artifact_files(local_stack)}
    for art in artifacts:
        assert art.content_hash == file_sha256(art.uri), art.name
        from stores.artifacts.local import LocalArtifactStore

        path = LocalArtifactStore("/").path_for(art.uri)
        assert str(path) in stored
        assert art.size_bytes == path.stat().st_size


def test_run_records_config_and_environment(local_stack: Settings) -> None:
    run = basic.chain(n=4)

    assert run.config["parameters"] == {"n": 4}
    assert run.config["steps"]["source"]["parameters"] == {"n": 4}
    assert run.config["stack"]["orchestrator"] == "local"
    assert run.config["stack"]["artifact_uri"] == local_stack.resolved_artifact_uri()
    env = run.environment
    assert env["system"]["python"] == sys.version.split()[0]
    assert "zenml-workers" in env["packages"]
    # The pipeline module lives in this checkout; during development it may have no commit yet.
    git = env["git"]
    assert "commit" in git and "dirty" in git
    assert isinstance(git["dirty"], bool)


def test_dataframe_and_numpy_array_flow_between_steps(local_stack: Settings) -> None:
    run = ml.tabular(rows=20, seed=3)

    assert run.status == "completed"
    frame = run.steps["make_frame"].output.load()
    assert isinstance(frame, pd.DataFrame)
    pd.testing.assert_frame_equal(frame, ml.make_frame.entrypoint(rows=20, seed=3))
    matrix = run.steps["to_matrix"].output.load()
    assert isinstance(matrix, np.ndarray)
    assert matrix.shape == (20, 3) and matrix.dtype == np.float64
    means = run.steps["column_means"].output.load()
    np.testing.assert_allclose(means, matrix.mean(axis=0))
    assert run.steps["report"].output.load() == ml.expected_report(rows=20, seed=3)
