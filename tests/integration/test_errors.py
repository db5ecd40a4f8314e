"""What users see when things go wrong, on the embedded default: failures, retries, bad config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from stores.artifacts.local import LocalArtifactStore
from stores.metadata.models import ArtifactRow, PipelineRow, RunRow
from tests.pipelines import basic, failing, fixtures
from tests.pipelines.fixtures import artifact_files
from zenml_workers import Client, pipeline, step, submit
from zenml_workers.errors import (
    ConfigurationError,
    PipelineDefinitionError,
    StepFailedError,
    ZenMLWorkersError,
)
from zenml_workers.sdk.stack import get_stack
from zenml_workers.settings import Settings

#: The embedded-default stack fixture, used by name as a test argument.
local_stack = fixtures.local_stack

RUN_TIMEOUT_S = 90.0


def _row_count(settings: Settings, model: type) -> int:
    with get_stack(settings).metadata.read() as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


def _is_one_sentence(text: str) -> bool:
    """No sentence break inside: a ., ! or ? followed by whitespace (dotted names do not count)."""
    return re.search(r"[.!?]\s", text.strip()) is None


# -- a step that raises -----------------------------------------------------------------------


def test_raising_step_fails_the_run_with_its_traceback(local_stack: Settings) -> None:
    with pytest.raises(StepFailedError) as info:
        failing.exploding(n=1)

    err = info.value
    assert err.step == "explode"
    assert "'explode'" in str(err)
    assert failing.RAISING_LINE in err.remote_traceback
    assert "ValueError: explode got 1, which is not allowed" in err.remote_traceback
    run = Client().get_run(err.run_id)
    assert run.status == "failed"
    assert "explode" in run.message
    step_run = run.steps["explode"]
    assert step_run.status == "failed"
    assert step_run.exception == "ValueError: explode got 1, which is not allowed"
    assert failing.RAISING_LINE in step_run.traceback
    assert step_run.outputs == {}
    assert run.steps["start"].status == "completed"
    assert run.steps["after_explode"].status == "skipped"


def test_wait_raises_step_failed_error_naming_the_step(local_stack: Settings) -> None:
    handle = submit(failing.exploding, n=2)

    with pytest.raises(StepFailedError, match="step 'explode'") as info:
        handle.wait(timeout_s=RUN_TIMEOUT_S)

    assert info.value.run_id == handle.id
    assert failing.RAISING_LINE in info.value.remote_traceback
    assert handle.status == "failed"
    run = handle.wait(timeout_s=RUN_TIMEOUT_S, raise_on_failure=False)
    assert run.status == "failed"
    assert run.steps["after_explode"].status == "skipped"


def test_unpicklable_output_fails_with_one_sentence_and_leaves_nothing(
    local_stack: Settings,
) -> None:
    with pytest.raises(StepFailedError) as info:
        failing.unpicklable(n=1)

    assert info.value.step == "make_holder"
    run = Client().get_run(info.value.run_id)
    step_run = run.steps["make_holder"]
    assert step_run.status == "failed"
    message = step_run.exception.split(": ", 1)[1]
    assert "register_materializer" in message
    assert "LockHolder" in message
    assert _is_one_sentence(message), message
    assert step_run.outputs == {}
    with get_stack(local_stack).metadata.read() as s:
        rows = s.execute(select(ArtifactRow)).scalars().all()
        by_step = [r for r in rows if r.producer_step_run_id == step_run.id]
        uris = {r.uri for r in rows}
    assert by_step == []
    # Every file in the artifact folder belongs to a committed artifact (start's output only).
    store = LocalArtifactStore("/")
    assert [str(p) for p in artifact_files(local_stack)] == sorted(
        str(store.path_for(u)) for u in uris
    )
    assert len(uris) == 1


def test_flaky_step_with_retries_completes_on_third_attempt(
    local_stack: Settings, tmp_path: Path
) -> None:
    marker = tmp_path / "flaky-attempts"

    run = failing.flaky_pipeline(marker=str(marker), failures=2)

    assert run.status == "completed"
    step_run = run.steps["flaky"]
    assert step_run.status == "completed"
    assert step_run.attempt == 3
    assert step_run.output.load() == 3
    assert marker.read_text() == "3"


def test_flaky_step_out_of_retries_fails(local_stack: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "flaky-attempts"

    with pytest.raises(StepFailedError, match="flaky attempt 3 fails on purpose") as info:
        failing.flaky_pipeline(marker=str(marker), failures=5)

    run = Client().get_run(info.value.run_id)
    assert run.steps["flaky"].attempt == 3
    assert marker.read_text() == "3"


# -- refused before anything runs -------------------------------------------------------------


def test_unknown_queue_is_refused_at_submit_and_writes_nothing(local_stack: Settings) -> None:
    with pytest.raises(ConfigurationError) as info:
        submit(failing.unknown_queue, n=1)

    message = str(info.value)
    assert "'nope'" in message and "ZW_QUEUES" in message
    assert _is_one_sentence(message), message
    assert _row_count(local_stack, RunRow) == 0
    assert _row_count(local_stack, PipelineRow) == 0
    assert Client().list_runs() == []


def test_unknown_queue_is_accepted_once_listed_in_zw_queues(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZW_QUEUES", "cpu,gpu,nope")

    run = submit(failing.unknown_queue, n=4).wait(timeout_s=RUN_TIMEOUT_S)

    assert run.steps["misrouted"].queue == "nope"
    assert run.steps["misrouted"].output.load() == 4


def test_stack_file_with_bad_toml_is_a_configuration_error_naming_it(
    local_stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack_file = tmp_path / "team-stack.toml"
    stack_file.write_text('metadata_url = "sqlite:///x.db\nqueues = [cpu\n')
    monkeypatch.setenv("ZW_STACK_FILE", str(stack_file))

    with pytest.raises(ConfigurationError) as info:
        basic.chain(n=1)

    assert str(stack_file) in str(info.value)
    assert "TOML" in str(info.value)


def test_stack_file_with_unknown_key_is_a_configuration_error_naming_it(
    local_stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack_file = tmp_path / "team-stack.toml"
    stack_file.write_text('[stack]\nbroker = "redis://localhost:6379/0"\n')
    monkeypatch.setenv("ZW_STACK_FILE", str(stack_file))

    with pytest.raises(ConfigurationError) as info:
        submit(basic.chain, n=1)

    message = str(info.value)
    assert str(stack_file) in message
    assert "broker" in message and "broker_url" in message


def test_cycle_via_after_fails_at_build_before_any_run(local_stack: Settings) -> None:
    @pipeline
    def cyclic() -> None:
        basic.source(id="a", after="c")
        basic.source(id="b", after="a")
        basic.source(id="c", after="b")

    with pytest.raises(PipelineDefinitionError, match="cycle"):
        cyclic()
    with pytest.raises(PipelineDefinitionError, match="cycle"):
        submit(cyclic)
    assert _row_count(local_stack, RunRow) == 0


def test_missing_input_fails_at_build_before_any_run(local_stack: Settings) -> None:
    @pipeline
    def missing_input() -> None:
        basic.add(y=2)  # 'x' is required and never given

    with pytest.raises(PipelineDefinitionError, match="'x'"):
        missing_input()
    assert _row_count(local_stack, RunRow) == 0


def test_bad_step_definition_fails_at_decoration(local_stack: Settings) -> None:
    from zenml_workers.errors import StepDefinitionError

    with pytest.raises(StepDefinitionError, match="no type annotation"):

        @step
        def untyped(x):  # type: ignore[no-untyped-def]
            return x

    assert issubclass(StepDefinitionError, ZenMLWorkersError)
