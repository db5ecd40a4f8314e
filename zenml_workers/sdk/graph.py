"""The pipeline build context: wiring step calls into a DAG, validating it, sorting it.

While ``Pipeline.build`` runs the pipeline function, a :class:`BuildContext` sits
in a context variable (so concurrent builds on other threads or tasks do not
see each other). Each step call inside it becomes an :class:`Invocation` and
returns :class:`StepOutput` placeholders; passing those to later steps records
the data edges. :meth:`BuildContext.finalize` checks the ``after=`` edges, sorts
the invocations topologically and freezes them into ``StepSpec`` objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args, get_origin

from scheduler.specs import InputRef, InputSpec, StepSpec, canonical_json
from zenml_workers.errors import PipelineDefinitionError
from zenml_workers.sdk.annotations import (
    admits_none,
    describe_type,
    types_compatible,
    value_matches,
)
from zenml_workers.sdk.names import name_problem
from zenml_workers.sdk.resources import resolve_queue, settings_to_json

if TYPE_CHECKING:
    from zenml_workers.sdk.source import CodeBlob
    from zenml_workers.sdk.step import Step

__all__ = [
    "BuildContext",
    "StepOutput",
    "StepOutputs",
    "build_context",
    "current_build",
]

_CURRENT: contextvars.ContextVar[BuildContext | None] = contextvars.ContextVar(
    "zenml_workers_build", default=None
)
_NO_OUTPUT_HINT = (
    "; if it comes from a step that returns nothing (-> None), that step has no output to "
    "pass, so give it a return annotation or order the steps with after= instead"
)


class StepOutput:
    """A placeholder for one output of a step invocation, valid inside one pipeline build."""

    def __init__(
        self, build: BuildContext, invocation_id: str, output_name: str | None, type_: Any
    ) -> None:
        self.build = build
        self.invocation_id = invocation_id
        self.output_name = output_name
        self.type = type_

    def __repr__(self) -> str:
        return f"StepOutput({self.invocation_id!r}, {self.output_name!r})"

    def __iter__(self) -> Iterator[Any]:
        raise PipelineDefinitionError(
            f"pipeline '{self.build.pipeline_name}', step '{self.invocation_id}': it has one "
            f"output ('{self.output_name}'), which cannot be unpacked; assign it to one name"
        )

    def __getitem__(self, key: Any) -> StepOutput:
        if key == self.output_name:
            return self
        raise PipelineDefinitionError(
            f"pipeline '{self.build.pipeline_name}', step '{self.invocation_id}': it has no "
            f"output {key!r}; its only output is '{self.output_name}'"
        )


class StepOutputs(tuple, StepOutput):  # type: ignore[type-arg]
    """The outputs of a multi-output step: a tuple of :class:`StepOutput`, also indexable by name."""

    def __new__(cls, outputs: tuple[StepOutput, ...], **_: Any) -> StepOutputs:
        return tuple.__new__(cls, outputs)

    def __init__(self, outputs: tuple[StepOutput, ...], *, build: BuildContext, invocation_id: str):
        StepOutput.__init__(self, build, invocation_id, None, None)

    def __repr__(self) -> str:
        return f"StepOutputs({self.invocation_id!r}, {[o.output_name for o in self]!r})"

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            for out in self:
                if out.output_name == key:
                    return out
            names = ", ".join(repr(o.output_name) for o in self)
            raise PipelineDefinitionError(
                f"pipeline '{self.build.pipeline_name}', step '{self.invocation_id}': it has no "
                f"output {key!r}; use one of {names}"
            )
        return tuple.__getitem__(self, key)


@dataclass
class Invocation:
    """One step call recorded during a build."""

    id: str
    step: Step
    order: int
    inputs: list[InputSpec] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    data_upstream: set[str] = field(default_factory=set)
    after: list[str] = field(default_factory=list)


class BuildContext:
    """Collects step invocations while a pipeline function runs."""

    def __init__(
        self, pipeline_name: str, enable_cache: bool = True, settings: dict[str, Any] | None = None
    ) -> None:
        self.pipeline_name = pipeline_name
        self.enable_cache = enable_cache
        self.settings = dict(settings or {})
        self.invocations: dict[str, Invocation] = {}
        self._name_counts: dict[str, int] = {}

    def error(self, invocation_id: str, message: str) -> PipelineDefinitionError:
        return PipelineDefinitionError(
            f"pipeline '{self.pipeline_name}', step '{invocation_id}': {message}"
        )

    # -- recording ---------------------------------------------------------------------------

    def _claim_id(self, step_name: str, requested: str | None) -> str:
        if requested is not None:
            if not isinstance(requested, str) or not requested:
                raise self.error(step_name, f"id={requested!r} must be a non-empty string")
            problem = name_problem(requested, dots=False)
            if problem is not None:
                raise self.error(step_name, f"id={requested!r} {problem}")
            if requested in self.invocations:
                raise self.error(
                    requested,
                    "this id is already used by another call in this pipeline; "
                    "pass a different id= to one of them",
                )
            return requested
        n = self._name_counts.get(step_name, 0)
        while True:
            n += 1
            candidate = step_name if n == 1 else f"{step_name}_{n}"
            if candidate not in self.invocations:
                self._name_counts[step_name] = n
                return candidate

    def _check_ours(self, inv_id: str, what: str, out: StepOutput) -> None:
        if out.build is not self:
            raise self.error(
                inv_id,
                f"{what} is an output of step '{out.invocation_id}' from another pipeline build "
                f"('{out.build.pipeline_name}'); call that step inside this pipeline instead",
            )

    def _after_ids(self, inv_id: str, after: Any) -> list[str]:
        items = after if isinstance(after, list) or type(after) is tuple else [after]
        ids: list[str] = []
        for item in items:
            if isinstance(item, StepOutput):
                self._check_ours(inv_id, "after=", item)
                ids.append(item.invocation_id)
            elif isinstance(item, str) and item:
                ids.append(item)
            else:
                raise self.error(
                    inv_id,
                    f"after={item!r} is not a step id or step output; pass the id string of a "
                    f"step called in this pipeline (or a list of them)",
                )
        return ids

    def _bind_input(self, inv: Invocation, name: str, value: Any, annotation: Any) -> None:
        if isinstance(value, StepOutputs):
            raise self.error(
                inv.id,
                f"input '{name}' got all outputs of step '{value.invocation_id}'; pick one by "
                f'unpacking or by name (e.g. ["{value[0].output_name}"]), or pass list(...) '
                f"to fan them in",
            )
        if isinstance(value, StepOutput):
            inv.inputs.append(InputSpec(name, (self._ref(inv, name, value, annotation),)))
            return
        if isinstance(value, (list, tuple)) and any(isinstance(v, StepOutput) for v in value):
            self._bind_fan_in(inv, name, value, annotation)
            return
        inv.parameters[name] = self._parameter(inv, name, value, annotation)

    def _ref(self, inv: Invocation, name: str, out: StepOutput, expected: Any) -> InputRef:
        """Check one upstream output against the input it feeds and record the edge."""
        self._check_ours(inv.id, f"input '{name}'", out)
        if not types_compatible(out.type, expected):
            raise self.error(
                inv.id,
                f"input '{name}' expects {describe_type(expected)} but output '{out.output_name}' "
                f"of step '{out.invocation_id}' is {describe_type(out.type)}; fix one annotation",
            )
        inv.data_upstream.add(out.invocation_id)
        return InputRef(out.invocation_id, out.output_name or "")

    def _bind_fan_in(self, inv: Invocation, name: str, values: Any, annotation: Any) -> None:
        if not types_compatible(list, get_origin(annotation) or annotation):
            raise self.error(
                inv.id,
                f"input '{name}' expects {describe_type(annotation)} but receives a list of step "
                f"outputs; annotate it as list[...]",
            )
        args = get_args(annotation) if get_origin(annotation) is list else ()
        refs = []
        for i, v in enumerate(values):
            if not isinstance(v, StepOutput) or isinstance(v, StepOutputs):
                hint = _NO_OUTPUT_HINT if v is None else ""
                raise self.error(
                    inv.id,
                    f"input '{name}' mixes step outputs with other values (item {i} is {v!r}); "
                    f"pass a list made only of single step outputs{hint}",
                )
            refs.append(self._ref(inv, name, v, args[0] if args else Any))
        inv.inputs.append(InputSpec(name, tuple(refs), is_list=True))

    def _parameter(self, inv: Invocation, name: str, value: Any, annotation: Any) -> Any:
        try:
            normalised = json.loads(canonical_json(value))
        except (TypeError, ValueError) as e:
            raise self.error(
                inv.id,
                f"parameter '{name}' got a {type(value).__name__}, which is not JSON ({e}); "
                f"produce it from a step or pass it as JSON-able values",
            ) from e
        ok = value_matches(value, annotation)
        if ok is None and value is None:
            ok = admits_none(annotation)
        if ok is False:
            default = inv.step.signature.parameters[name].default
            if not (value is None and default is None):
                hint = _NO_OUTPUT_HINT if value is None else ""
                raise self.error(
                    inv.id,
                    f"parameter '{name}' expects {describe_type(annotation)} but got "
                    f"{type(value).__name__} {value!r}; pass a {describe_type(annotation)}{hint}",
                )
        return normalised

    def invoke(
        self, step: Step, args: tuple[Any, ...], kwargs: dict[str, Any], id: str | None, after: Any
    ) -> StepOutput | None:
        """Record one call of ``step`` and return its output placeholders.

        Raises:
            PipelineDefinitionError: for any wiring mistake in this call.
        """
        inv_id = self._claim_id(step.name, id)
        params = step.signature.parameters
        names = list(params)
        if len(args) > len(names):
            raise self.error(
                inv_id,
                f"{len(args)} positional arguments given but the step takes {len(names)} "
                f"({', '.join(names) or 'none'}); remove the extra ones",
            )
        given: dict[str, Any] = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in params:
                raise self.error(
                    inv_id,
                    f"unknown argument '{key}'; the step takes {', '.join(names) or 'none'}",
                )
            if key in given:
                raise self.error(inv_id, f"argument '{key}' given twice; pass it once")
            given[key] = value
        inv = Invocation(id=inv_id, step=step, order=len(self.invocations))
        if after is not None:
            inv.after = self._after_ids(inv_id, after)
        for name, param in params.items():
            annotation = step.type_hints.get(name, Any)
            if name in given:
                self._bind_input(inv, name, given[name], annotation)
            elif param.default is inspect.Parameter.empty:
                raise self.error(
                    inv_id,
                    f"required input '{name}' is missing; pass a step output or a value for it",
                )
            else:
                # A default that is not JSON is left to the function itself at run time.
                with contextlib.suppress(TypeError, ValueError):
                    inv.parameters[name] = json.loads(canonical_json(param.default))
        self.invocations[inv_id] = inv
        outputs = step.output_types
        if not outputs:
            return None
        placeholders = tuple(StepOutput(self, inv_id, n, t) for n, t in outputs.items())
        if len(placeholders) == 1:
            return placeholders[0]
        return StepOutputs(placeholders, build=self, invocation_id=inv_id)

    # -- freezing ----------------------------------------------------------------------------

    def _upstream(self) -> dict[str, set[str]]:
        ups: dict[str, set[str]] = {}
        for inv in self.invocations.values():
            deps = set(inv.data_upstream)
            for a in inv.after:
                if a not in self.invocations:
                    known = ", ".join(self.invocations) or "none"
                    raise self.error(
                        inv.id,
                        f"after='{a}' names no step call in this pipeline (ids: {known}); "
                        f"use the id of a step called in this pipeline",
                    )
                deps.add(a)
            ups[inv.id] = deps
        return ups

    def _cycle_error(
        self, remaining: set[str], ups: dict[str, set[str]]
    ) -> PipelineDefinitionError:
        node = min(remaining, key=lambda i: self.invocations[i].order)
        path: list[str] = []
        while node not in path:
            path.append(node)
            node = min(
                (u for u in ups[node] if u in remaining), key=lambda i: self.invocations[i].order
            )
        cycle = path[path.index(node) :]
        cycle.reverse()  # walked against the edges; show the order things would run in
        first = cycle.index(min(cycle, key=lambda i: self.invocations[i].order))
        cycle = cycle[first:] + cycle[:first]
        shown = " -> ".join([*cycle, cycle[0]])
        return self.error(
            cycle[0],
            f"it is on a dependency cycle ({shown}) made by after=; remove one of those after= "
            f"dependencies",
        )

    def topological_order(self, ups: dict[str, set[str]] | None = None) -> list[str]:
        """Invocation ids in dependency order, ties broken by call order.

        Raises:
            PipelineDefinitionError: for an unknown ``after=`` id or a cycle.
        """
        ups = self._upstream() if ups is None else ups
        waiting = {i: len(deps) for i, deps in ups.items()}
        downstream: dict[str, list[str]] = {i: [] for i in ups}
        for i, deps in ups.items():
            for d in deps:
                downstream[d].append(i)
        ready = [(self.invocations[i].order, i) for i, n in waiting.items() if n == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            _, i = heapq.heappop(ready)
            order.append(i)
            for d in downstream[i]:
                waiting[d] -= 1
                if waiting[d] == 0:
                    heapq.heappush(ready, (self.invocations[d].order, d))
        if len(order) < len(ups):
            raise self._cycle_error(set(ups) - set(order), ups)
        return order

    def finalize(self) -> tuple[tuple[StepSpec, ...], dict[str, CodeBlob]]:
        """Freeze the recorded calls into sorted ``StepSpec`` objects and their code blobs.

        Raises:
            PipelineDefinitionError: for an unknown ``after=`` id, a cycle, or bad settings.
        """
        ups = self._upstream()
        specs: list[StepSpec] = []
        code: dict[str, CodeBlob] = {}
        for inv_id in self.topological_order(ups):
            spec, blob = self.freeze(self.invocations[inv_id], tuple(sorted(ups[inv_id])))
            code.setdefault(blob.code_hash, blob)
            specs.append(spec)
        return tuple(specs), code

    def freeze(self, inv: Invocation, upstream: tuple[str, ...]) -> tuple[StepSpec, CodeBlob]:
        """One recorded call as a ``StepSpec`` (upstream ids given) and its step's code blob.

        Raises:
            PipelineDefinitionError: when the step's settings are invalid.
        """
        step = inv.step
        cfg = step.config
        merged = {**self.settings, **(cfg.settings or {})}
        try:
            settings = settings_to_json(merged, cfg.resources)
            queue = resolve_queue(cfg.step_type, cfg.queue, cfg.resources, merged)
        except (TypeError, ValueError) as e:
            raise self.error(inv.id, f"its settings are invalid ({e})") from e
        blob, inherit = step.code_blob(), self.enable_cache
        spec = StepSpec(
            invocation_id=inv.id,
            name=step.name,
            code_hash=blob.code_hash,
            source_hash=step.source_hash,
            inputs=tuple(inv.inputs),
            parameters=inv.parameters,
            upstream=upstream,
            outputs=step.output_specs(),
            queue=queue,
            step_type=cfg.step_type,
            enable_cache=inherit if cfg.enable_cache is None else cfg.enable_cache,
            retries=cfg.retries,
            timeout_s=cfg.timeout_s,
            settings=settings,
            cache_expires_after_s=cfg.cache_expires_after_s,
            experiment_tracker=cfg.experiment_tracker,
        )
        return spec, blob


def current_build() -> BuildContext | None:
    """The build in progress on this thread or task, or None outside ``Pipeline.build``."""
    return _CURRENT.get()


@contextmanager
def build_context(context: BuildContext) -> Iterator[BuildContext]:
    """Make ``context`` the current build for the duration of the ``with`` block."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)
