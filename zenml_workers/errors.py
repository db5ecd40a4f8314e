"""Every exception zenml-workers raises on purpose, under one root.

Catch :class:`ZenMLWorkersError` to handle them all; each area (definition,
execution, configuration, stores) has its own root beneath it.
"""

from __future__ import annotations

from stores.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ArtifactStoreCredentialsError,
    ArtifactStoreError,
    ArtifactStoreUnavailableError,
    InfrastructureError,
    MetadataStoreError,
    MetadataStoreUnavailableError,
    NotFoundError,
    StoreError,
    ZenMLWorkersError,
)

__all__ = [
    "ArtifactIntegrityError",
    "ArtifactNotFoundError",
    "ArtifactStoreCredentialsError",
    "ArtifactStoreError",
    "ArtifactStoreUnavailableError",
    "BrokerUnavailableError",
    "CacheError",
    "CodeIntegrityError",
    "ConfigurationError",
    "DefinitionError",
    "ExecutionError",
    "ExperimentTrackerError",
    "InfrastructureError",
    "MaterializerError",
    "MetadataStoreError",
    "MetadataStoreUnavailableError",
    "NoWorkerForQueueError",
    "NotFoundError",
    "PipelineDefinitionError",
    "ReproduceError",
    "RunCancelledError",
    "RunFailedError",
    "RunTimeoutError",
    "StackRecordError",
    "StackComponentError",
    "StepContextError",
    "StepDefinitionError",
    "StepFailedError",
    "StepTimeoutError",
    "StoreError",
    "StoreMismatchError",
    "UntrustedInputError",
    "ZenMLWorkersError",
]


class DefinitionError(ZenMLWorkersError):
    """Raised when a step or pipeline is defined or wired wrongly, before anything runs."""


class StepDefinitionError(DefinitionError):
    """Raised when ``@step`` cannot turn a function into a step (missing hints, ``*args``...)."""


class PipelineDefinitionError(DefinitionError):
    """Raised when a pipeline's DAG is invalid: a cycle, a missing input, a bad parameter."""


class ConfigurationError(ZenMLWorkersError):
    """Raised when settings or a stack file are invalid or name something unknown."""


class StackRecordError(ConfigurationError):
    """Raised when a stack record cannot be registered, imported, shared or deleted: a literal
    secret where a reference belongs, a bad component, a taken name, or a user who is not
    its owner. Nothing is written."""


class CacheError(ZenMLWorkersError, ValueError):
    """Raised when a cache listing, clearing or garbage collection is asked something it
    cannot do (an age that is not a period, a run that does not exist), or when ``gc`` kept
    losing races with runs planned while it deleted. Nothing is deleted in either case."""


class MaterializerError(ZenMLWorkersError):
    """Raised when a value cannot be saved to or loaded from an artifact."""


class ExecutionError(ZenMLWorkersError):
    """Raised when a run cannot be executed or does not finish as asked."""


class RunFailedError(ExecutionError):
    """Raised by ``wait()`` when a run ends failed; carries the failed steps."""

    def __init__(self, message: str, *, run_id: str, failed_steps: dict[str, str] | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.failed_steps = failed_steps or {}


class StepFailedError(RunFailedError):
    """Raised by ``wait()`` when a step raised; carries the step's remote traceback. A
    worker's Celery task raises it too, after recording the failure, so that the task ends
    in FAILURE with the step's exception (Flower)."""

    def __init__(self, message: str, *, run_id: str, step: str, remote_traceback: str):
        super().__init__(message, run_id=run_id, failed_steps={step: remote_traceback})
        self.step = step
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        # Picklable with its keyword arguments (Celery pickles a task's exception).
        return _step_failed, (str(self), self.run_id, self.step, self.remote_traceback)


def _step_failed(message: str, run_id: str, step: str, remote_traceback: str) -> StepFailedError:
    return StepFailedError(message, run_id=run_id, step=step, remote_traceback=remote_traceback)


class StepTimeoutError(ExecutionError):
    """Raised inside a step that ran past its ``timeout_s`` (recorded as the step's failure and
    retried if it has retries), and recorded for a step killed because it did not stop."""


class RunCancelledError(ExecutionError):
    """Raised by ``wait()`` when the run was cancelled."""


class RunTimeoutError(ExecutionError):
    """Raised by ``wait(timeout_s=...)`` when the run did not finish in time."""


class ReproduceError(ExecutionError):
    """Raised when a run cannot be retried or rerun as asked: a completed run retried, a run
    still going retried or rerun. Nothing is written."""


class NoWorkerForQueueError(ExecutionError):
    """Raised or reported when steps wait on a queue that no live worker consumes."""


class BrokerUnavailableError(InfrastructureError):
    """Raised when the broker (Redis) cannot be reached to send or receive step tasks."""


class CodeIntegrityError(ExecutionError):
    """Raised when a step's code blob does not hash to the ``code_hash`` its run recorded."""


class UntrustedInputError(ExecutionError):
    """Raised when a step message names an artifact outside the stack's artifact store or a
    materializer that is neither registered nor in an allowed module."""


class StoreMismatchError(ExecutionError):
    """Raised when a worker refuses a step message planned in another metadata store than its
    own (the client and the workers have different ``ZW_METADATA_URL``), and by ``wait()`` on
    timeout when workers refused the run's steps for that reason."""


class StackComponentError(ExecutionError):
    """Raised when a stack component (an experiment tracker, a data validator...) cannot do
    its part of a step: it is not installed on the worker or its server cannot be reached."""


class ExperimentTrackerError(StackComponentError):
    """Raised when a step's experiment tracker (MLflow) cannot start the step's tracking run,
    before the step's own code runs; the step fails and its retries apply."""


class StepContextError(ExecutionError, RuntimeError):
    """Raised by ``get_step_context()`` outside a running step (a step called as a plain
    function, or code that runs outside any step)."""
