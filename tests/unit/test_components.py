"""Stack components without a server: the registry, the step hooks and the step context,
with an in-memory experiment tracker standing in for MLflow."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest

from scheduler.specs import PipelineSpec, StepSpec
from zenml_workers import get_step_context, pipeline, step, trainer
from zenml_workers.components import lifecycle, registry
from zenml_workers.components.base import (
    ComponentKind,
    DataValidator,
    ExperimentTracker,
    RunRecord,
    StackComponent,
    StepOutcome,
    is_tracked,
)
from zenml_workers.components.client import TrackerRun
from zenml_workers.components.lifecycle import PlainScope, StepScope, step_scope
from zenml_workers.components.mlflow_tracker import MLflowExperimentTracker, _params
from zenml_workers.errors import (
    ConfigurationError,
    ExperimentTrackerError,
    StepContextError,
    StepDefinitionError,
)
from zenml_workers.sdk.step_context import METRICS_KEY, StepContext
from zenml_workers.settings import load_settings
from zenml_workers.worker.stop import StepStopped


class FakeTracker(ExperimentTracker):
    """Records every hook call and metric, keyword arguments included."""

    flavor = "fake"

    def __init__(self, fail_before: bool = False, fail_after: bool = False) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.fail_before, self.fail_after = fail_before, fail_after

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FakeTracker:
        return cls(fail_before=bool(config.get("fail_before")))

    def config(self) -> dict[str, Any]:
        return {"flavor": self.flavor}

    def before_step(self, **kwargs: Any) -> None:
        self.calls.append(("before", kwargs))
        if self.fail_before:
            raise ExperimentTrackerError("fake tracker is down")
        kwargs["context"].metadata["fake_run_id"] = "r-1"

    def after_step(self, **kwargs: Any) -> None:
        self.calls.append(("after", kwargs))
        if self.fail_after:
            raise RuntimeError("fake tracker lost the run")

    def log_metrics(
        self, metrics: Mapping[str, float], *, step: int | None, context: StepContext
    ) -> None:
        self.metrics.append((dict(metrics), step))


def _context(**overrides: Any) -> StepContext:
    values: dict[str, Any] = {
        "run_id": "run-1",
        "step_run_id": "sr-1",
        "invocation_id": "train",
        "step_name": "train",
        "step_type": "trainer",
        "parameters": {"lr": 0.1},
    }
    values.update(overrides)
    return StepContext(**values)


def _spec(step_type: str = "step", experiment_tracker: bool | None = None) -> StepSpec:
    return StepSpec(
        invocation_id="s",
        name="s",
        code_hash="c",
        source_hash="h",
        step_type=step_type,
        experiment_tracker=experiment_tracker,
    )


# -- which steps are tracked -------------------------------------------------------------


@pytest.mark.parametrize(
    ("step_type", "wanted", "tracked"),
    [
        ("trainer", None, True),
        ("step", None, False),
        ("step", True, True),
        ("trainer", False, False),
    ],
)
def test_is_tracked_defaults_to_trainers_and_obeys_the_step(
    step_type: str, wanted: bool | None, tracked: bool
) -> None:
    assert is_tracked(_spec(step_type, wanted)) is tracked


def test_step_option_reaches_the_spec_of_a_built_pipeline() -> None:
    @step(experiment_tracker=True)
    def evaluate(x: int) -> int:
        return x

    @trainer
    def fit(x: int) -> int:
        return x

    @step
    def load() -> int:
        return 1

    @pipeline
    def p() -> None:
        x = load()
        evaluate(fit(x))
        fit.with_options(experiment_tracker=False)(x, id="fit_untracked")

    built = p.build().spec
    specs = built.by_id()
    assert [is_tracked(specs[i]) for i in ("load", "fit", "evaluate", "fit_untracked")] == [
        False,
        True,
        True,
        False,
    ]
    assert specs["evaluate"].experiment_tracker is True
    decoded = PipelineSpec.decode(built.encode()).by_id()  # as a worker reads it
    assert decoded["fit_untracked"].experiment_tracker is False
    assert decoded["fit"].experiment_tracker is None


def test_step_option_refuses_a_non_bool() -> None:
    with pytest.raises(StepDefinitionError, match="experiment_tracker='yes' must be True"):

        @step(experiment_tracker="yes")  # type: ignore[call-overload]
        def s() -> None: ...


# -- registry ----------------------------------------------------------------------------


def test_component_records_are_empty_without_a_tracking_uri(tmp_path: Any) -> None:
    settings = load_settings(home=tmp_path)
    assert registry.component_records(settings) == {}
    assert registry.components_for(settings) == ()
    assert "experiment_tracker" not in settings.describe()


def test_components_for_builds_the_mlflow_tracker_recorded_on_runs(tmp_path: Any) -> None:
    settings = load_settings(
        home=tmp_path, mlflow_tracking_uri="http://mlflow:5000", mlflow_experiment_name="team"
    )
    record = {"flavor": "mlflow", "tracking_uri": "http://mlflow:5000", "experiment_name": "team"}
    assert settings.describe()["experiment_tracker"] == record
    (tracker,) = registry.components_for(settings)
    assert isinstance(tracker, MLflowExperimentTracker)
    assert tracker.kind is ComponentKind.EXPERIMENT_TRACKER
    assert tracker.config() == record
    # Built once per distinct record and process: a worker keeps its MLflow client.
    assert registry.components_from_stack({"experiment_tracker": record}) == (tracker,)


def test_component_records_refuse_a_password_in_the_tracking_uri(tmp_path: Any) -> None:
    settings = load_settings(home=tmp_path, mlflow_tracking_uri="http://u:hunter2@mlflow:5000")
    with pytest.raises(ConfigurationError, match="MLFLOW_TRACKING_PASSWORD") as e:
        registry.component_records(settings)
    assert "hunter2" not in str(e.value)


def test_components_from_stack_names_an_unknown_flavor() -> None:
    with pytest.raises(ConfigurationError, match="flavor 'wandb'.*known: mlflow"):
        registry.components_from_stack({"experiment_tracker": {"flavor": "wandb"}})


def test_register_flavor_makes_a_custom_tracker_buildable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "FLAVORS", dict(registry.FLAVORS))
    registry.register_flavor(FakeTracker)
    stack = {"stack": "x", "metadata_url": "sqlite://", "experiment_tracker": {"flavor": "fake"}}
    (tracker,) = registry.components_from_stack(stack)
    assert isinstance(tracker, FakeTracker)


def test_data_validator_is_an_interface_used_from_steps_not_around_them() -> None:
    class Validator(DataValidator):
        flavor = "always_ok"

        @classmethod
        def from_config(cls, config: Mapping[str, Any]) -> StackComponent:
            return cls()

        def config(self) -> dict[str, Any]:
            return {"flavor": self.flavor}

        def validate(self, dataset: Any, **kwargs: Any) -> Any:
            return {"rows": len(dataset), "passed": True}

    validator = Validator()
    assert validator.kind is ComponentKind.DATA_VALIDATOR
    assert not validator.wants(_spec("trainer", True))
    assert validator.validate([1, 2]) == {"rows": 2, "passed": True}
    with pytest.raises(TypeError):
        DataValidator()  # type: ignore[abstract]


def test_importing_the_package_and_building_the_tracker_does_not_import_mlflow() -> None:
    code = (
        "import sys, zenml_workers; from zenml_workers.components.registry import components_for;"
        "from zenml_workers.settings import load_settings;"
        "components_for(load_settings(mlflow_tracking_uri='http://mlflow:5000'));"
        "import zenml_workers.worker.execute;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the hooks around a step -------------------------------------------------------------


def test_scope_calls_hooks_with_keywords_and_sets_the_step_context() -> None:
    tracker = FakeTracker()
    run = RunRecord(id="run-1", name="n", pipeline="p", user="ann")
    context = _context()
    with StepScope(context, (tracker,), run) as entered:
        assert get_step_context() is entered is context
        assert context.experiment_tracker is tracker
        get_step_context().log_metrics({"loss": 0.5, "acc": 1}, step=2)
        get_step_context().log_metrics({"loss": 0.25})
    with pytest.raises(StepContextError, match="outside a running step"):
        get_step_context()
    (before, before_kw), (after, after_kw) = tracker.calls
    assert (before, after) == ("before", "after")
    assert set(before_kw) == {"context", "run", "serialize"}
    assert after_kw["outcome"] is StepOutcome.COMPLETED and after_kw["error"] is None
    assert after_kw["run"] is run
    assert tracker.metrics == [({"loss": 0.5, "acc": 1.0}, 2), ({"loss": 0.25}, None)]
    # What the step records: the tracker's run id and the last value of each metric.
    assert context.metadata == {"fake_run_id": "r-1", METRICS_KEY: {"loss": 0.25, "acc": 1.0}}
    assert context.experiment_tracker is None


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ValueError("bad data"), StepOutcome.FAILED),
        (StepStopped("cancel", "cancelled"), StepOutcome.STOPPED),
    ],
)
def test_scope_tells_the_tracker_how_the_step_ended(
    error: BaseException, outcome: StepOutcome
) -> None:
    tracker = FakeTracker()
    with pytest.raises(type(error)), StepScope(_context(), (tracker,)):
        raise error
    assert tracker.calls[-1][1]["outcome"] is outcome
    assert tracker.calls[-1][1]["error"] is error


def test_scope_fails_the_step_when_the_tracker_cannot_start_and_clears_the_context() -> None:
    tracker = FakeTracker(fail_before=True)
    body_ran = False
    with (
        pytest.raises(ExperimentTrackerError, match="fake tracker is down"),
        StepScope(_context(), (tracker,)),
    ):
        body_ran = True
    assert not body_ran
    assert [c for c, _ in tracker.calls] == ["before"]  # nothing began, nothing to end
    with pytest.raises(StepContextError):
        get_step_context()


def test_scope_only_warns_when_the_tracker_cannot_end(caplog: pytest.LogCaptureFixture) -> None:
    tracker = FakeTracker(fail_after=True)
    with StepScope(_context(), (tracker,)):
        pass
    assert "could not end its part of the step: fake tracker lost the run" in caplog.text


def test_untracked_step_gets_a_context_without_reading_the_run() -> None:
    class NoStore:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError("an untracked step must not touch the metadata store")

    ctx: Any = SimpleNamespace(metadata=NoStore(), backoff=None)
    row = SimpleNamespace(run_id="run-1", id="sr-1", attempt=2)
    recorded: dict[str, Any] = {}
    scope = step_scope(_spec("step"), row, ctx, recorded)
    assert isinstance(scope, PlainScope)
    with scope:
        context = get_step_context()
        assert get_step_context() is context  # built once, on first ask
        assert (context.run_id, context.attempt, context.experiment_tracker) == ("run-1", 2, None)
        context.log_metrics({"rows": 10})
    assert recorded == {METRICS_KEY: {"rows": 10.0}}
    with pytest.raises(StepContextError):
        get_step_context()


def test_tracked_step_gets_the_components_of_its_runs_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry, "FLAVORS", dict(registry.FLAVORS))
    registry.register_flavor(FakeTracker)
    run = RunRecord(
        id="run-1",
        name="n",
        pipeline="p",
        user="ann",
        stack={"experiment_tracker": {"flavor": "fake"}},
    )
    monkeypatch.setattr(lifecycle, "run_record", lambda ctx, run_id: run)
    ctx: Any = SimpleNamespace(metadata=object())
    row = SimpleNamespace(run_id="run-1", id="sr-1", attempt=1)
    scope = step_scope(_spec("trainer"), row, ctx, {})
    assert isinstance(scope, StepScope)
    (tracker,) = scope.components
    assert isinstance(tracker, FakeTracker)
    assert scope.run is run and callable(scope.serialize)
    # The same stack without a tracker: the trainer runs untracked.
    monkeypatch.setattr(lifecycle, "run_record", lambda ctx, run_id: RunRecord("r", "n", "p", "u"))
    assert isinstance(step_scope(_spec("trainer"), row, ctx, {}), PlainScope)


def test_log_metrics_refuses_what_is_not_a_number() -> None:
    context = _context()
    with pytest.raises(TypeError, match="metric 'model' is str"):
        context.log_metrics({"model": "resnet"})
    with pytest.raises(TypeError, match="whole number"):
        context.log_metrics({"loss": 1.0}, step=-1)
    with pytest.raises(TypeError, match="dict of name"):
        context.log_metrics([("loss", 1.0)])  # type: ignore[arg-type]
    assert context.metadata == {}


def test_tracker_run_view_reads_the_step_metadata() -> None:
    meta = {
        "mlflow_run_id": "c1",
        "mlflow_parent_run_id": "p1",
        "mlflow_experiment_id": "3",
        "mlflow_tracking_uri": "http://mlflow:5000/",
    }
    run = TrackerRun.of(meta)
    assert run is not None and (run.run_id, run.parent_run_id) == ("c1", "p1")
    assert run.url == "http://mlflow:5000/#/experiments/3/runs/c1"
    assert TrackerRun.of({"duration_s": 1.0}) is None


def test_mlflow_params_are_flattened_text() -> None:
    assert _params({"lr": 0.1, "opt": {"name": "adam", "betas": [0.9, 0.99]}, "empty": {}}) == {
        "lr": "0.1",
        "opt.name": "adam",
        "opt.betas": "[0.9, 0.99]",
        "empty": "{}",
    }
