"""The MLflow experiment tracker (the documents' ``MLflowExperimentTracker``).

Per pipeline run, one MLflow run in the experiment (``ZW_MLFLOW_EXPERIMENT_NAME``, default
the pipeline's name), tagged ``zenml_workers.run_id``; per attempt of a tracked step, one
nested run under it (tag ``mlflow.parentRunId``) with the step's parameters, the metrics it
logs and, when it ends, ``FINISHED``, ``FAILED`` or ``KILLED`` (cancelled, timed out). The
step's run is also MLflow's active run while the step runs, so ``mlflow.log_metric`` or
``mlflow.autolog()`` inside the step land there too.

The parent run is found by its tag; when it is missing, workers create it one at a time
(:meth:`StackComponent.before_step`'s ``serialize``: a transaction on the run's row in the
metadata store) and look again first, so two steps starting together on two workers make
one parent. Its status follows the latest tracked step to end.

``mlflow`` is imported only here, the first time a worker process runs a tracked step.
MLflow's HTTP retries are shortened (2 retries, 10 s timeout) unless the worker's
``MLFLOW_HTTP_REQUEST_*`` variables say otherwise, so a server that is down fails a step
within seconds instead of minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from stores.metadata.store import redact_url
from zenml_workers.components.base import ExperimentTracker, RunRecord, StepOutcome
from zenml_workers.errors import ConfigurationError, ExperimentTrackerError

if TYPE_CHECKING:
    from zenml_workers.sdk.step_context import StepContext

__all__ = ["MLflowExperimentTracker"]

log = logging.getLogger("zenml_workers.worker")

RUN_TAG = "zenml_workers.run_id"
ROLE_TAG = "zenml_workers.role"
#: Step-metadata keys this tracker records on a step run.
RUN_ID_KEY = "mlflow_run_id"
PARENT_RUN_ID_KEY = "mlflow_parent_run_id"
EXPERIMENT_ID_KEY = "mlflow_experiment_id"
TRACKING_URI_KEY = "mlflow_tracking_uri"

_STATUS = {
    StepOutcome.COMPLETED: "FINISHED",
    StepOutcome.FAILED: "FAILED",
    StepOutcome.STOPPED: "KILLED",
}
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # The run ids are recorded on the step; no "View run" lines in its logs.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
#: MLflow's longest parameter value (longer ones are cut, with a marker).
_PARAM_MAX_CHARS = 6000


class MLflowExperimentTracker(ExperimentTracker):
    """Tracks steps as nested MLflow runs on the server at ``tracking_uri``.

    Args:
        tracking_uri: the MLflow tracking server (``http://mlflow:5000``), without credentials.
        experiment_name: the experiment the runs go to (None: the pipeline's name).
    """

    flavor = "mlflow"

    def __init__(self, tracking_uri: str, experiment_name: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name or None
        self._client: Any = None
        self._experiments: dict[str, str] = {}
        self._parents: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MLflowExperimentTracker:
        uri = config.get("tracking_uri")
        if not isinstance(uri, str) or not uri:
            raise ConfigurationError(
                "the stack's MLflow experiment tracker has no tracking URI; set "
                "ZW_MLFLOW_TRACKING_URI (e.g. http://mlflow:5000) on the stack"
            )
        name = config.get("experiment_name")
        return cls(uri, str(name) if name else None)

    def config(self) -> dict[str, Any]:
        return {
            "flavor": self.flavor,
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
        }

    # -- hooks ---------------------------------------------------------------------------

    def before_step(
        self,
        *,
        context: StepContext,
        run: RunRecord,
        serialize: Callable[[], AbstractContextManager[Any]] | None = None,
        **future_kwargs: Any,
    ) -> None:
        client = self._mlflow_client()
        try:
            experiment_id = self._experiment_id(client, self.experiment_name or run.pipeline)
            parent = self._parent_run(client, experiment_id, run, serialize)
            child = client.create_run(
                experiment_id,
                run_name=context.invocation_id,
                tags={
                    "mlflow.parentRunId": parent,
                    "mlflow.user": run.user,
                    RUN_TAG: run.id,
                    ROLE_TAG: "step",
                    "zenml_workers.step": context.invocation_id,
                    "zenml_workers.step_run_id": context.step_run_id,
                    "zenml_workers.attempt": str(context.attempt),
                },
            ).info.run_id
            params = _params(context.parameters)
            if params:
                from mlflow.entities import Param

                client.log_batch(child, params=[Param(k, v) for k, v in params.items()])
        except ExperimentTrackerError:
            raise
        except Exception as e:
            raise self._unreachable(f"start the run of step {context.invocation_id!r}", e) from e
        context.metadata.update(
            {
                RUN_ID_KEY: child,
                PARENT_RUN_ID_KEY: parent,
                EXPERIMENT_ID_KEY: experiment_id,
                TRACKING_URI_KEY: redact_url(self.tracking_uri),
            }
        )
        self._activate(child, context)

    def log_metrics(
        self, metrics: Mapping[str, float], *, step: int | None, context: StepContext
    ) -> None:
        run_id = context.metadata.get(RUN_ID_KEY)
        if not run_id or not metrics:
            return
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(k, v, now_ms, step or 0) for k, v in metrics.items()]
        try:
            self._mlflow_client().log_batch(run_id, metrics=batch)
        except Exception as e:
            raise self._unreachable(f"log metrics of step {context.invocation_id!r}", e) from e

    def after_step(
        self,
        *,
        context: StepContext,
        run: RunRecord,
        outcome: StepOutcome,
        error: BaseException | None = None,
        **future_kwargs: Any,
    ) -> None:
        run_id = context.metadata.get(RUN_ID_KEY)
        if not run_id:
            return
        status = _STATUS[outcome]
        client = self._mlflow_client()
        try:
            if not self._deactivate(run_id, status):
                client.set_terminated(run_id, status=status)
            client.set_terminated(context.metadata[PARENT_RUN_ID_KEY], status=status)
        except Exception as e:
            raise self._unreachable(f"end the run of step {context.invocation_id!r}", e) from e

    # -- MLflow --------------------------------------------------------------------------

    def _mlflow_client(self) -> Any:
        if self._client is None:
            for name, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            try:
                from mlflow.tracking import MlflowClient
            except ImportError as e:
                raise ExperimentTrackerError(
                    f"MLflow is not installed in this worker's environment, so the stack's "
                    f"experiment tracker ({redact_url(self.tracking_uri)}) cannot track this "
                    "step; install it there with `pip install 'zenml-workers[mlflow]'`"
                ) from e
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self, client: Any, name: str) -> str:
        hit = self._experiments.get(name)
        if hit is not None:
            return hit
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            # Fails when another worker created it meanwhile: it is read back either way.
            with contextlib.suppress(Exception):
                client.create_experiment(name)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise self._unreachable(f"create the experiment {name!r}", None)
        if experiment.lifecycle_stage == "deleted":
            raise ExperimentTrackerError(
                f"MLflow experiment {name!r} at {redact_url(self.tracking_uri)} is deleted, so "
                "no run can be added to it; restore it (`mlflow experiments restore`) or "
                "name another one with ZW_MLFLOW_EXPERIMENT_NAME"
            )
        self._experiments[name] = experiment.experiment_id
        return str(experiment.experiment_id)

    def _parent_run(
        self,
        client: Any,
        experiment_id: str,
        run: RunRecord,
        serialize: Callable[[], AbstractContextManager[Any]] | None,
    ) -> str:
        with self._lock:
            hit = self._parents.get(run.id)
        if hit is not None:
            return hit
        parent = self._find_parent(client, experiment_id, run.id)
        if parent is None:
            with serialize() if serialize is not None else nullcontext():
                # Looked up again under the run's lock: another worker may have just made it.
                parent = self._find_parent(client, experiment_id, run.id)
                if parent is None:
                    parent = client.create_run(
                        experiment_id,
                        run_name=run.name,
                        tags={
                            RUN_TAG: run.id,
                            ROLE_TAG: "pipeline_run",
                            "mlflow.user": run.user,
                            "zenml_workers.pipeline": run.pipeline,
                        },
                    ).info.run_id
                    log.info("run %s: created MLflow parent run %s", run.id, parent)
        with self._lock:
            self._parents[run.id] = parent
            if len(self._parents) > 256:
                self._parents.popitem(last=False)
        return parent

    @staticmethod
    def _find_parent(client: Any, experiment_id: str, run_id: str) -> str | None:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_TAG}` = '{run_id}' and tags.`{ROLE_TAG}` = 'pipeline_run'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        return str(found[0].info.run_id) if found else None

    def _activate(self, run_id: str, context: StepContext) -> None:
        """Make the step's run MLflow's active run in this thread (for the step's own
        ``mlflow.log_*`` calls); a failure only warns, the run is tracked either way."""
        try:
            import mlflow

            if mlflow.active_run() is not None:
                log.warning(
                    "run %s step %s: an MLflow run is already active in this worker thread; "
                    "the step's own mlflow.log_* calls go there, not to its run %s",
                    context.run_id,
                    context.invocation_id,
                    run_id,
                )
                return
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.start_run(run_id=run_id)
        except Exception as e:  # noqa: BLE001 - a convenience; logging through us still works
            log.warning(
                "run %s step %s: could not make MLflow run %s active (%s)",
                context.run_id,
                context.invocation_id,
                run_id,
                e,
            )

    @staticmethod
    def _deactivate(run_id: str, status: str) -> bool:
        """End the step's run through MLflow's active-run stack if it is on top of it."""
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:
            return False
        mlflow.end_run(status=status)
        return True

    def _unreachable(self, doing: str, e: BaseException | None) -> ExperimentTrackerError:
        why = "" if e is None else f" ({type(e).__name__}: {_short(e)})"
        return ExperimentTrackerError(
            f"MLflow tracking server at {redact_url(self.tracking_uri)} could not {doing}{why}; "
            "start the server or fix the stack's ZW_MLFLOW_TRACKING_URI, or opt the step out "
            "with @step(experiment_tracker=False)"
        )


def _short(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _params(parameters: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Step parameters as MLflow params: nested dicts flattened to ``a.b``, values as text."""
    out: dict[str, str] = {}
    for key, value in parameters.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_params(value, prefix=f"{name}."))
            continue
        text = str(value)
        if len(text) > _PARAM_MAX_CHARS:
            text = text[: _PARAM_MAX_CHARS - 3] + "..."
        out[name] = text
    return out
