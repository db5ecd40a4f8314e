"""The stack-component interface: what an experiment tracker, a data validator and later
kinds implement, named as the ZenML documents name them.

A stack has the core components (orchestrator, metadata store, artifact store) and optional
ones, each of a *kind* (``experiment_tracker``, ``data_validator``) and a *flavor*
(``mlflow``, ``evidently``). An optional component is configured on the client's stack, its
configuration travels with each run (``runs.config["stack"]``), and a worker builds it from
there for the steps that use it. It takes part in a step through lifecycle hooks, called with
keyword arguments only (plus ``**future_kwargs``, so new arguments break no component):

- :meth:`StackComponent.before_step`, after the inputs are loaded and before the step's own
  code runs; raising fails the attempt (nothing was computed yet);
- :meth:`StackComponent.after_step`, once the outputs are stored (or the attempt failed);
  raising only warns: the step's outputs are kept.

Standard library only: importing this module imports no component's client library.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from scheduler.specs import StepSpec
    from zenml_workers.sdk.step_context import StepContext

__all__ = [
    "ComponentKind",
    "DataValidator",
    "ExperimentTracker",
    "RunRecord",
    "StackComponent",
    "StepOutcome",
]


class ComponentKind(enum.StrEnum):
    """The kinds of optional stack components (ZenML's ``StackComponentType``)."""

    EXPERIMENT_TRACKER = "experiment_tracker"
    DATA_VALIDATOR = "data_validator"


class StepOutcome(enum.StrEnum):
    """How a step attempt ended, as :meth:`StackComponent.after_step` is told."""

    COMPLETED = "completed"
    FAILED = "failed"
    #: Cancelled, past its timeout, or handed back to the broker at shutdown.
    STOPPED = "stopped"


@dataclass(frozen=True)
class RunRecord:
    """The pipeline run a step belongs to, as a worker read it from the metadata store."""

    id: str
    name: str
    pipeline: str
    user: str
    #: The run's stack as recorded when it was submitted (``runs.config["stack"]``).
    stack: Mapping[str, Any] = field(default_factory=dict)


class StackComponent(ABC):
    """One configured optional component of a stack.

    Subclasses set :attr:`kind` and :attr:`flavor` and are built from their recorded
    configuration by :meth:`from_config`. One instance serves every step of a worker process
    (it may cache clients and ids); per-step state goes into the step's
    :class:`~zenml_workers.sdk.step_context.StepContext`.
    """

    kind: ClassVar[ComponentKind]
    flavor: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, Any]) -> StackComponent:
        """Build the component from :meth:`config` as a run recorded it.

        Raises:
            ConfigurationError: the configuration is incomplete or invalid.
        """

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Its configuration as a run records it: JSON values, never a secret (credentials
        stay in each worker's environment)."""

    def wants(self, step: StepSpec) -> bool:
        """Whether ``step`` uses this component (default: every step)."""
        return True

    def before_step(  # noqa: B027 - an optional hook: doing nothing is the default
        self,
        *,
        context: StepContext,
        run: RunRecord,
        serialize: Any = None,
        **future_kwargs: Any,
    ) -> None:
        """Called before the step's own code runs (its inputs are loaded).

        Args:
            context: the attempt's step context; record ids in ``context.metadata``.
            run: the pipeline run.
            serialize: a context-manager factory that serialises its block with every other
                worker's for this run (one transaction on the run's row in the metadata
                store), for once-per-run work such as creating a parent run; None in tests.

        Raises:
            StackComponentError: the component cannot take part; the attempt fails.
        """

    def after_step(  # noqa: B027 - an optional hook: doing nothing is the default
        self,
        *,
        context: StepContext,
        run: RunRecord,
        outcome: StepOutcome,
        error: BaseException | None = None,
        **future_kwargs: Any,
    ) -> None:
        """Called once the attempt ended: outputs stored (``COMPLETED``), or it raised.

        Raising here only logs a warning; the attempt ends as it did.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()!r})"


class ExperimentTracker(StackComponent):
    """Records each tracked step as an experiment run (ZenML's ``BaseExperimentTracker``).

    A step is tracked when it says so (``@step(experiment_tracker=True)``) or, by default, when
    it is a ``@trainer``. Inside a tracked step, ``get_step_context().log_metrics(...)`` reaches
    :meth:`log_metrics`.
    """

    kind = ComponentKind.EXPERIMENT_TRACKER

    def wants(self, step: StepSpec) -> bool:
        return is_tracked(step)

    @abstractmethod
    def log_metrics(
        self, metrics: Mapping[str, float], *, step: int | None, context: StepContext
    ) -> None:
        """Log ``metrics`` to this attempt's run (started by :meth:`before_step`).

        Raises:
            ExperimentTrackerError: the tracker did not take them.
        """


class DataValidator(StackComponent):
    """Checks data and models against expectations (ZenML's ``BaseDataValidator``; flavors
    there: Evidently, Great Expectations, Deepchecks, whylogs).

    Interface only: no flavor ships yet. A flavor registers itself in
    :data:`zenml_workers.components.registry.FLAVORS` and is called from a step, e.g. a
    validation step that gets it from its step context.
    """

    kind = ComponentKind.DATA_VALIDATOR

    def wants(self, step: StepSpec) -> bool:
        return False  # used explicitly from a step, not around every step

    @abstractmethod
    def validate(
        self,
        dataset: Any,
        *,
        reference: Any = None,
        checks: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Validate ``dataset`` (optionally against ``reference``) and return the flavor's
        report, which a step can return as an artifact.

        Raises:
            StackComponentError: the validator cannot run.
        """


def is_tracked(step: StepSpec) -> bool:
    """Whether ``step`` gets an experiment-tracker run: what it said, else only a ``@trainer``."""
    wanted = step.experiment_tracker
    return step.step_type == "trainer" if wanted is None else wanted
