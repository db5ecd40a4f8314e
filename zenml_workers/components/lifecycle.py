"""Around one step attempt in a worker: its step context and its components' hooks.

:func:`step_scope` is called by ``worker/execute.py`` once the inputs are loaded; the
returned :class:`StepScope` wraps the step's call and the storing of its outputs. A step no
component wants (the common case: not a ``@trainer``, no ``experiment_tracker=True``) gets a
scope that only sets its step context: no read, no import, no hook. For one that may be
tracked, the run's recorded stack is read once per run and process, and the components it
names are built once per process.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from zenml_workers.components.base import (
    ExperimentTracker,
    RunRecord,
    StackComponent,
    StepOutcome,
    is_tracked,
)
from zenml_workers.sdk.step_context import StepContext, enter, leave

if TYPE_CHECKING:
    from scheduler.specs import StepSpec
    from stores.metadata.store import MetadataStore
    from zenml_workers.worker.context import WorkerContext

__all__ = ["PlainScope", "StepScope", "outcome_of", "run_lock", "step_scope"]

log = logging.getLogger("zenml_workers.worker")

_RUNS: OrderedDict[str, RunRecord] = OrderedDict()
_RUNS_MAX = 64


class StepScope:
    """A ``with`` block around a step's call and the storing of its outputs: sets its
    :class:`StepContext`, calls each component's ``before_step`` on entry and ``after_step``
    on exit (in reverse order; a failing ``after_step`` only warns)."""

    __slots__ = ("_begun", "_token", "components", "context", "run", "serialize")

    def __init__(
        self,
        context: StepContext,
        components: tuple[StackComponent, ...] = (),
        run: RunRecord | None = None,
        serialize: Any = None,
    ) -> None:
        self.context = context
        self.components = components
        self.run = run or RunRecord(id=context.run_id, name="", pipeline="", user="")
        self.serialize = serialize
        self._begun: list[StackComponent] = []
        self._token: Any = None

    def __enter__(self) -> StepContext:
        self._token = enter(self.context)
        if not self.components:
            return self.context
        try:
            for component in self.components:
                component.before_step(context=self.context, run=self.run, serialize=self.serialize)
                self._begun.append(component)
                if isinstance(component, ExperimentTracker):
                    self.context.experiment_tracker = component
        except BaseException as e:
            self._end(e)
            leave(self._token)
            raise
        return self.context

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._begun:
                self._end(exc)
        finally:
            leave(self._token)

    def _end(self, error: BaseException | None) -> None:
        outcome = outcome_of(error)
        context = self.context
        for component in reversed(self._begun):
            try:
                component.after_step(context=context, run=self.run, outcome=outcome, error=error)
            except Exception as e:  # noqa: BLE001 - the attempt ends as it did
                log.warning(
                    "run %s step %s attempt %d: %s %s could not end its part of the step: %s",
                    context.run_id,
                    context.invocation_id,
                    context.attempt,
                    component.kind.value.replace("_", " "),
                    component.flavor,
                    e,
                )
        self._begun.clear()
        context.experiment_tracker = None


class PlainScope:
    """The scope of a step no component wants: sets a step context that is built only if the
    step asks for it (``get_step_context()``), so most steps pay one context-variable set."""

    __slots__ = ("_token", "recorded", "row", "step")

    def __init__(self, step: StepSpec, row: Any, recorded: dict[str, Any]) -> None:
        self.step, self.row, self.recorded = step, row, recorded

    def step_context(self) -> StepContext:
        """The attempt's :class:`StepContext`, recording into ``recorded``."""
        step, row = self.step, self.row
        return StepContext(
            run_id=row.run_id,
            step_run_id=row.id,
            invocation_id=step.invocation_id,
            step_name=step.name,
            step_type=step.step_type,
            attempt=row.attempt,
            parameters=step.parameters,
            metadata=self.recorded,
        )

    def __enter__(self) -> None:
        self._token = enter(self)

    def __exit__(self, *exc_info: object) -> None:
        leave(self._token)


def outcome_of(error: BaseException | None) -> StepOutcome:
    """How an attempt ended, from what its body raised (None: it completed)."""
    if error is None:
        return StepOutcome.COMPLETED
    from zenml_workers.errors import StepTimeoutError
    from zenml_workers.worker.stop import StepStopped

    if isinstance(error, StepStopped | StepTimeoutError | KeyboardInterrupt | SystemExit):
        return StepOutcome.STOPPED
    return StepOutcome.FAILED


def step_scope(
    step: StepSpec, row: Any, ctx: WorkerContext, recorded: dict[str, Any]
) -> StepScope | PlainScope:
    """The scope of one attempt of ``step`` (claimed ``row``); ``recorded`` receives what the
    step context and the components record on the step run (its ``step_metadata``).

    Raises:
        InfrastructureError: the metadata store stayed unreachable while reading the run.
        ConfigurationError: the run's stack names a component flavor unknown here.
    """
    plain = PlainScope(step, row, recorded)
    # Only a tracked step may want a component around its body (data validators are called
    # from a step): deciding it from the spec keeps every other step free of any cost.
    if not is_tracked(step):
        return plain
    from zenml_workers.components.registry import components_from_stack

    run = run_record(ctx, row.run_id)
    components = tuple(c for c in components_from_stack(run.stack) if c.wants(step))
    if not components:
        if step.experiment_tracker:
            log.info(
                "run %s step %s asked for an experiment tracker, but the run's stack has none "
                "(set ZW_MLFLOW_TRACKING_URI on the submitting stack); it runs untracked",
                row.run_id,
                step.invocation_id,
            )
        return plain
    store = ctx.metadata
    return StepScope(
        plain.step_context(), components, run, serialize=lambda: run_lock(store, row.run_id)
    )


def run_record(ctx: WorkerContext, run_id: str) -> RunRecord:
    """The run's name, pipeline, user and recorded stack, read once per run and process.

    Raises:
        InfrastructureError: the metadata store stayed unreachable for the retry budget.
    """
    hit = _RUNS.get(run_id)
    if hit is not None:
        return hit
    from scheduler.backoff import call_with_backoff
    from stores.metadata import queries as q

    def read() -> RunRecord:
        with ctx.metadata.read() as s:
            row = q.get_run(s, run_id)
            return RunRecord(
                id=row.id,
                name=row.name,
                pipeline=row.pipeline_name,
                user=row.user or "",
                stack=dict((row.config or {}).get("stack") or {}),
            )

    record = call_with_backoff(read, what=f"run {run_id}: read its stack", policy=ctx.backoff)
    _RUNS[run_id] = record
    if len(_RUNS) > _RUNS_MAX:
        _RUNS.popitem(last=False)
    return record


@contextmanager
def run_lock(store: MetadataStore, run_id: str) -> Iterator[None]:
    """Serialise the block with every other worker's ``run_lock`` on ``run_id``: it runs in a
    transaction holding the run's row locked (PostgreSQL) or the database's write lock
    (SQLite), released at commit or when the connection drops (a crashed worker)."""
    from sqlalchemy import update

    from stores.metadata.models import RunRow

    with store.transaction() as s:
        s.execute(update(RunRow).where(RunRow.id == run_id).values(status=RunRow.status))
        yield
