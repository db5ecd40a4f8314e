"""``get_step_context()``: what a running step can ask about itself and tell its stack.

Set by the worker around each step attempt (standard library only, so a pipeline module
that imports it stays light). Inside a step::

    from zenml_workers import get_step_context

    @trainer
    def train(data: list[float], epochs: int = 3) -> float:
        for epoch in range(epochs):
            loss = ...
            get_step_context().log_metrics({"loss": loss}, step=epoch)
        return loss

Metrics go to the stack's experiment tracker (MLflow) when the step is tracked, and their
last values are recorded on the step (``step_metadata["metrics"]``) in any case.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from zenml_workers.errors import StepContextError

if TYPE_CHECKING:
    from zenml_workers.components.base import ExperimentTracker

__all__ = ["METRICS_KEY", "StepContext", "get_step_context"]

log = logging.getLogger("zenml_workers.worker")

#: Where a step's last metric values are recorded in its step metadata.
METRICS_KEY = "metrics"

#: The running step's context, or a scope that builds it on first ask (most steps never ask:
#: building it only then keeps their per-step cost to setting this variable).
_CURRENT: ContextVar[Any] = ContextVar("zw_step_context", default=None)


class StepContext:
    """The running attempt of one step: who it is and what it records.

    Attributes:
        run_id: the pipeline run's id.
        step_run_id: the step run's id (one row per invocation, across attempts).
        invocation_id: the step's id in its pipeline (``train``, ``train_2``...).
        step_name: the step's name (its function name unless renamed).
        step_type: ``"step"`` or ``"trainer"``.
        attempt: 1 for the first attempt, 2 for its first retry...
        parameters: the step's parameters (not its artifact inputs).
        experiment_tracker: the stack's experiment tracker when this step is tracked, else None.
        metadata: what is recorded on the step run when the attempt ends (its
            ``step_metadata``); components write their run ids here.
    """

    __slots__ = (
        "attempt",
        "experiment_tracker",
        "invocation_id",
        "metadata",
        "parameters",
        "run_id",
        "step_name",
        "step_run_id",
        "step_type",
        "_warned",
    )

    def __init__(
        self,
        *,
        run_id: str,
        step_run_id: str,
        invocation_id: str,
        step_name: str,
        step_type: str = "step",
        attempt: int = 1,
        parameters: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.run_id = run_id
        self.step_run_id = step_run_id
        self.invocation_id = invocation_id
        self.step_name = step_name
        self.step_type = step_type
        self.attempt = attempt
        self.parameters: Mapping[str, Any] = parameters or {}
        self.experiment_tracker: ExperimentTracker | None = None
        self.metadata: dict[str, Any] = {} if metadata is None else metadata
        self._warned = False

    def __repr__(self) -> str:
        return (
            f"StepContext(run_id={self.run_id!r}, invocation_id={self.invocation_id!r}, "
            f"attempt={self.attempt})"
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics of this attempt, e.g. ``{"loss": 0.12, "accuracy": 0.9}``.

        They go to the experiment tracker's run of this step (MLflow: one metric point per
        key, at ``step``, default 0) and their last values to the step's metadata. A tracker
        that fails here only warns: the step's work is worth more than its record.

        Args:
            metrics: metric names to numbers (bools and non-numbers are refused).
            step: the training step or epoch these values belong to (a whole number >= 0).

        Raises:
            TypeError: a value is not a number, a name is not a string, or ``step`` is not a
                whole number of 0 or more.
        """
        values = _checked(metrics, step)
        recorded = self.metadata.setdefault(METRICS_KEY, {})
        recorded.update({k: v for k, v in values.items() if math.isfinite(v)})
        tracker = self.experiment_tracker
        if tracker is None:
            if not self._warned:
                self._warned = True
                log.info(
                    "run %s step %s: no experiment tracker for this step, so its metrics are "
                    "recorded on the step only (track it with @step(experiment_tracker=True) "
                    "on a stack with an MLflow tracking URI)",
                    self.run_id,
                    self.invocation_id,
                )
            return
        try:
            tracker.log_metrics(values, step=step, context=self)
        except Exception as e:  # noqa: BLE001 - the step's work is worth more than the record
            log.warning(
                "run %s step %s: %s; the metrics are kept on the step only",
                self.run_id,
                self.invocation_id,
                e,
            )


def _checked(metrics: Mapping[str, float], step: int | None) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"log_metrics() takes a dict of name -> number, not {type(metrics).__name__}"
        )
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise TypeError(f"log_metrics(step={step!r}): step must be a whole number of 0 or more")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"log_metrics(): metric name {name!r} must be a non-empty string")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy scalars, 0-d tensors
            except (TypeError, ValueError):
                raise TypeError(
                    f"log_metrics(): metric {name!r} is {type(value).__name__}, not a number"
                ) from None
        out[name] = float(value)
    return out


def get_step_context() -> StepContext:
    """The :class:`StepContext` of the step running in this thread.

    Raises:
        StepContextError: outside a running step (e.g. a step called as a plain function).
    """
    context = _CURRENT.get()
    if context is None:
        raise StepContextError(
            "get_step_context() was called outside a running step; call it inside a step's "
            "function while a pipeline runs it (a step called directly has no step context)"
        )
    if type(context) is not StepContext:
        context = context.step_context()
        _CURRENT.set(context)  # undone with the rest by the scope's leave()
    return context


def enter(context: Any) -> Any:
    """Make ``context`` the current one (a :class:`StepContext`, or an object whose
    ``step_context()`` builds it on first ask); returns the token for :func:`leave`."""
    return _CURRENT.set(context)


def leave(token: Any) -> None:
    """Restore the step context from before :func:`enter`."""
    _CURRENT.reset(token)
