"""The MLflow experiment tracker on the team's services, checked through MLflow's own client.

A real ``mlflow server`` (SQLite backend) is started by the tests. The tracking URI is part of
the submitting user's stack (``ZW_MLFLOW_TRACKING_URI`` in their shell) and travels with each
run; the team's workers were started without it.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.services.mlflow import MLflowServer
from tests.services.process import free_port, settings_from_env
from tests.team.conftest import Team

pytestmark = pytest.mark.services

PIPELINES = """
import json

from zenml_workers import get_step_context, pipeline, step, submit, trainer


@step
def load(n: int = 20) -> list[float]:
    return [float(i % 7) for i in range(n)]


@trainer
def train(data: list[float], lr: float = 0.1, epochs: int = 3) -> float:
    loss = 1.0
    for epoch in range(epochs):
        loss *= 1.0 - lr
        get_step_context().log_metrics({"loss": loss}, step=epoch)
    return loss


@step(experiment_tracker=True)
def profile(data: list[float]) -> float:
    mean = sum(data) / len(data)
    get_step_context().log_metrics({"mean": mean})
    return mean


@step
def report(loss: float, mean: float) -> str:
    get_step_context().log_metrics({"reported": 1})  # untracked: kept on the step only
    return f"loss={loss:.3f} mean={mean:.3f}"


@pipeline
def tracked_training(lr: float = 0.1) -> None:
    data = load()
    report(train(data, lr=lr), profile(data))


@trainer(queue="cpu")
def diverge(data: list[float]) -> float:
    get_step_context().log_metrics({"loss": 9.0})
    raise FloatingPointError("loss diverged")


@pipeline
def tracked_failure() -> None:
    diverge(load())


out = {}
"""


def _runs(client: Any, experiment_ids: list[str], query: str) -> list[Any]:
    return list(client.search_runs(experiment_ids, filter_string=query, max_results=100))


def test_tracked_steps_get_nested_mlflow_runs_per_pipeline_run(
    team: Team, mlflow_server: MLflowServer
) -> None:
    ann_env = {"ZW_MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}
    # Ann's stack has the tracker: two runs (lr changes, so load and profile are cached the
    # second time), then one whose tracked step fails.
    ann = team.run_as(
        "ann",
        PIPELINES
        + """
for lr in (0.1, 0.2):
    out[str(lr)] = submit(tracked_training, lr=lr).wait(timeout_s=90, progress=False).id
failed = submit(tracked_failure).wait(timeout_s=90, progress=False, raise_on_failure=False)
out["failed"] = failed.id
out["failed_status"] = failed.status
print(json.dumps(out))
""",
        env=ann_env,
    )
    ids = team.last_json(ann)
    assert ids["failed_status"] == "failed"
    # Bob's stack has no tracker: the same workers track nothing of his run.
    bob = team.run_as(
        "bob",
        PIPELINES
        + """
print(json.dumps(submit(tracked_training, lr=0.3).wait(timeout_s=90, progress=False).id))
""",
    )
    bob_run = team.last_json(bob)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert {"tracked_training", "tracked_failure"} <= set(experiments)
    all_ids = list(experiments.values())

    parents = _runs(client, all_ids, "tags.`zenml_workers.role` = 'pipeline_run'")
    by_run = {p.data.tags["zenml_workers.run_id"]: p for p in parents}
    # One parent per tracked pipeline run, even with two tracked steps starting together on
    # two workers (train on the gpu worker, profile on the cpu pool); none for Bob's run.
    assert sorted(by_run) == sorted([ids["0.1"], ids["0.2"], ids["failed"]])
    assert len(parents) == 3 and bob_run not in by_run
    assert by_run[ids["0.1"]].data.tags["mlflow.user"] == "ann"

    def children(run_id: str) -> dict[str, Any]:
        parent = by_run[run_id].info.run_id
        found = _runs(client, all_ids, f"tags.`mlflow.parentRunId` = '{parent}'")
        return {c.data.tags["zenml_workers.step"]: c for c in found}

    first = children(ids["0.1"])
    assert sorted(first) == ["profile", "train"]  # not load, not report: untracked
    train = first["train"]
    assert train.info.status == "FINISHED"
    assert train.data.params == {"lr": "0.1", "epochs": "3"}
    history = client.get_metric_history(train.info.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.9), (1, 0.81), (2, 0.729)]
    assert first["profile"].data.metrics == {"mean": pytest.approx(2.85)}
    # The second run reused load and profile from the cache: only its trainer ran and is tracked.
    second = children(ids["0.2"])
    assert sorted(second) == ["train"]
    assert second["train"].data.params["lr"] == "0.2"
    failed = children(ids["failed"])["diverge"]
    assert failed.info.status == "FAILED" and failed.data.metrics == {"loss": 9.0}

    # The run id is recorded on the step, visible in Python and in `zw show`.
    from zenml_workers import Client

    # (Team.settings would pass the workers' ZW_SKIP_GPU_CHECK, which no client setting has.)
    ann_settings = settings_from_env(team.user_env("ann"), exclude=("ZW_SKIP_GPU_CHECK",))
    run = Client(ann_settings).get_run(ids["0.1"])
    assert run.steps["train"].tracker is not None
    assert run.steps["train"].tracker.run_id == train.info.run_id
    assert run.steps["train"].tracker.parent_run_id == by_run[ids["0.1"]].info.run_id
    assert run.steps["report"].tracker is None
    assert run.steps["report"].metadata["metrics"] == {"reported": 1.0}
    assert run.steps["train"].metadata["metrics"] == {"loss": pytest.approx(0.729)}
    shown = team.zw("ann", "show", ids["0.1"]).stdout
    assert f"MLflow run of step train: {train.info.run_id}" in shown
    assert f"MLflow run of step profile: {first['profile'].info.run_id}" in shown
    assert "MLflow run of step report" not in shown


def test_an_mlflow_server_that_is_down_fails_the_step_naming_mlflow_and_the_uri(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("mlflow")
    from zenml_workers.components.base import RunRecord
    from zenml_workers.components.mlflow_tracker import MLflowExperimentTracker
    from zenml_workers.errors import ExperimentTrackerError
    from zenml_workers.sdk.step_context import StepContext

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after backoff
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = MLflowExperimentTracker(uri)
    context = StepContext(run_id="r", step_run_id="s", invocation_id="train", step_name="train")
    with pytest.raises(ExperimentTrackerError) as e:
        tracker.before_step(context=context, run=RunRecord("r", "n", "p", "ann"))
    message = str(e.value)
    assert message.startswith(f"MLflow tracking server at {uri} could not start the run")
    assert "ZW_MLFLOW_TRACKING_URI" in message and message.count(". ") == 0
    assert context.metadata == {}
