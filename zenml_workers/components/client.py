"""``Client`` access to what stack components (experiment trackers, ...) recorded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zenml_workers.components.base import StackComponent

__all__ = ["TrackerRun", "TrackingMixin"]


@dataclass(frozen=True)
class TrackerRun:
    """A step's run in the stack's experiment tracker, as the step recorded it.

    Attributes:
        flavor: the tracker (``mlflow``).
        run_id: the step attempt's own (nested) run.
        parent_run_id: the pipeline run's run, which it is nested under.
        experiment_id: the experiment both are in.
        tracking_uri: the tracking server, credentials hidden.
    """

    flavor: str
    run_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str

    @classmethod
    def of(cls, step_metadata: Mapping[str, Any] | None) -> TrackerRun | None:
        """The tracker run recorded in a step run's metadata, None for an untracked step."""
        from zenml_workers.components import mlflow_tracker as m

        meta = step_metadata or {}
        run_id = meta.get(m.RUN_ID_KEY)
        if not run_id:
            return None
        return cls(
            flavor="mlflow",
            run_id=str(run_id),
            parent_run_id=str(meta.get(m.PARENT_RUN_ID_KEY) or ""),
            experiment_id=str(meta.get(m.EXPERIMENT_ID_KEY) or ""),
            tracking_uri=str(meta.get(m.TRACKING_URI_KEY) or ""),
        )

    @property
    def url(self) -> str | None:
        """The run's page in the MLflow UI (None when the URI is not an http(s) server)."""
        uri = self.tracking_uri
        if not uri.startswith(("http://", "https://")) or not self.experiment_id:
            return None
        return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


class TrackingMixin:
    """``Client`` methods for what stack components recorded."""

    _stack: Any

    def stack_components(self) -> tuple[StackComponent, ...]:
        """The optional components (experiment tracker...) of this client's stack, built.

        Raises:
            ConfigurationError: a component's setting is invalid.
        """
        from zenml_workers.components.registry import components_for

        return components_for(self._stack.settings)

    def tracker_runs(self, run_id: str) -> dict[str, TrackerRun]:
        """The experiment-tracker run of each tracked step of a run, by invocation id.

        Raises:
            NotFoundError: no run has this id.
        """
        run = self.get_run(run_id)  # type: ignore[attr-defined]
        out: dict[str, TrackerRun] = {}
        for invocation_id, step in run.steps.items():
            tracked = TrackerRun.of(step.metadata)
            if tracked is not None:
                out[invocation_id] = tracked
        return out
