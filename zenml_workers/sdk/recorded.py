"""A pipeline rebuilt from a recorded run: its spec and code blobs, no source needed.

``Client().get_pipeline("training")`` gives a view whose ``submit()``, call and ``copy()``
work from the latest run's recorded :class:`~scheduler.specs.PipelineSpec` and the pickled
step functions in ``code_blobs`` alone, so a teammate without the pipeline's source can run
it again, or copy it with a step swapped for one of their own. A replacement step is
wired exactly as the recorded step was (same inputs, parameters and ``after=`` edges), so
every step upstream of it keeps its cache key and is a cache hit on the recorded outputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from scheduler.specs import InputRef, PipelineSpec, StepSpec
from zenml_workers.errors import NotFoundError, PipelineDefinitionError
from zenml_workers.sdk.pipeline import BuiltPipeline, Pipeline
from zenml_workers.sdk.source import CodeBlob
from zenml_workers.sdk.step import Step

if TYPE_CHECKING:
    from zenml_workers.sdk.client import RunView
    from zenml_workers.sdk.runner import RunHandle
    from zenml_workers.sdk.stack import Stack
    from zenml_workers.settings import Settings

__all__ = ["RecordedPipeline", "importable_pipeline", "load_recorded", "replace_step"]


def load_recorded(stack: Stack, *, run_id: str | None = None, pipeline: str | None = None) -> Any:
    """The recorded run ``run_id`` (or the latest run of ``pipeline``) as ``(row, BuiltPipeline)``.

    Raises:
        NotFoundError: no such run, the pipeline has no run, or a code blob is missing.
    """
    from stores.metadata import history
    from stores.metadata import queries as q

    with stack.metadata.read() as s:
        found = q.get_run(s, run_id) if run_id is not None else None
        if found is None:
            found = history.latest_run(s, pipeline or "")
        if found is None:
            raise NotFoundError(
                f"pipeline {pipeline!r} has no recorded run in the metadata store, so there is "
                "no spec to rebuild it from; run it once from its code first"
            )
        row = found
        s.expunge(row)
        spec = PipelineSpec.decode(row.spec)
        blobs = history.code_blobs(s, (st.code_hash for st in spec.steps))
        code = {h: CodeBlob(h, b.name, b.source or "", bytes(b.pickled)) for h, b in blobs.items()}
    missing = sorted({st.code_hash for st in spec.steps} - set(blobs))
    if missing:
        raise NotFoundError(
            f"run {row.id} refers to step code {missing[0]}, which the metadata store does not "
            "hold; run the pipeline from its code to record it again"
        )
    return row, BuiltPipeline(spec=spec, code=code)


def importable_pipeline(entrypoint: Mapping[str, Any] | None) -> Pipeline | None:
    """The ``@pipeline`` a run recorded as ``{"module", "qualname"}``, if this process can
    import it (None otherwise: the run then goes on with its recorded code)."""
    if not entrypoint or not entrypoint.get("module"):
        return None
    try:
        obj: Any = importlib.import_module(str(entrypoint["module"]))
        for part in str(entrypoint.get("qualname", "")).split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001 - user code may raise anything on import
        return None
    return obj if isinstance(obj, Pipeline) else None


def replace_step(
    spec: PipelineSpec, invocation_id: str, step: Any, *, pipeline_name: str
) -> tuple[StepSpec, CodeBlob]:
    """The spec of ``step`` wired exactly as the recorded step ``invocation_id`` was.

    Checks the replacement's signature against the wiring: every input and parameter the
    recorded step receives must be a parameter of ``step`` (of a compatible type where both
    are annotated), its other parameters need defaults, and every output that a downstream
    step reads must exist with a compatible type.

    Raises:
        PipelineDefinitionError: a sentence naming what does not fit and how to fix it.
    """
    from zenml_workers.sdk.annotations import describe_type, types_compatible
    from zenml_workers.sdk.graph import BuildContext, StepOutput

    by_id = spec.by_id()
    if invocation_id not in by_id:
        raise PipelineDefinitionError(
            f"pipeline '{spec.name}' has no step '{invocation_id}' to replace; its steps are "
            f"{', '.join(by_id)}"
        )
    original = by_id[invocation_id]
    where = f"replacement for step '{invocation_id}' of pipeline '{spec.name}'"
    if not isinstance(step, Step):
        raise PipelineDefinitionError(
            f"the {where} is a {type(step).__name__}, not a step; decorate it with @step or "
            "@trainer"
        )
    params = step.signature.parameters
    for i in original.inputs:
        if i.name not in params:
            sources = ", ".join(f"'{r.step}'" for r in i.refs)
            raise PipelineDefinitionError(
                f"the {where}, {step.name}, has no parameter '{i.name}', which the recorded step "
                f"receives from step {sources}; add a parameter '{i.name}' to it"
            )
    for name, value in original.parameters.items():
        if name not in params:
            raise PipelineDefinitionError(
                f"the {where}, {step.name}, has no parameter '{name}', which the recorded step "
                f"is given ({value!r}); add '{name}' to its signature (a default is enough)"
            )
    wired = {i.name for i in original.inputs} | set(original.parameters)
    for name, p in params.items():
        if name not in wired and p.default is p.empty:
            raise PipelineDefinitionError(
                f"the {where}, {step.name}, requires parameter '{name}', which the recorded "
                f"pipeline does not wire; give '{name}' a default"
            )
    for down in spec.steps:
        for i in down.inputs:
            for ref in i.refs:
                if ref.step != invocation_id:
                    continue
                if ref.output not in step.output_types:
                    has = ", ".join(f"'{n}'" for n in step.output_types) or "none"
                    raise PipelineDefinitionError(
                        f"the {where}, {step.name}, has no output '{ref.output}', which step "
                        f"'{down.invocation_id}' reads (its outputs: {has}); name an output "
                        f"'{ref.output}' with Annotated[..., '{ref.output}']"
                    )
                recorded = _output_type(original, ref.output)
                new = step.output_types[ref.output]
                if not types_compatible(new, recorded):
                    raise PipelineDefinitionError(
                        f"the {where}, {step.name}, returns {describe_type(new)} as output "
                        f"'{ref.output}', but step '{down.invocation_id}' reads it as "
                        f"{describe_type(recorded)} (the recorded type); return a "
                        f"{describe_type(recorded)}"
                    )
    # The graph's own build checks types of inputs and parameters and freezes the spec.
    build = BuildContext(pipeline_name, spec.enable_cache)

    def placeholder(ref: InputRef) -> StepOutput:
        return StepOutput(build, ref.step, ref.output, _output_type(by_id[ref.step], ref.output))

    kwargs: dict[str, Any] = dict(original.parameters)
    for i in original.inputs:
        refs = [placeholder(r) for r in i.refs]
        kwargs[i.name] = refs if i.is_list else refs[0]
    data_upstream = {r.step for i in original.inputs for r in i.refs}
    after = [u for u in original.upstream if u not in data_upstream]
    build.invoke(step, (), kwargs, invocation_id, after or None)
    return build.freeze(build.invocations[invocation_id], original.upstream)


def _output_type(step: StepSpec, output: str) -> Any:
    """The recorded type of one output, when this process can import it (else Any)."""
    from zenml_workers.sdk.materializers.registry import resolve_type

    for o in step.outputs:
        if o.name == output:
            return resolve_type(o.type_path) or Any
    return Any


class RecordedPipeline:
    """A pipeline rebuilt from a recorded run, runnable and copyable without its source.

    Args:
        built: the recorded spec and code blobs (replacements already applied).
        stack: the stack it was read from (runs go there unless ``settings`` say otherwise).
        source_run: the run it was rebuilt from.
        replaced: the steps swapped so far, by invocation id.
        copied_from: the recorded pipeline's name when this is a copy.
    """

    def __init__(
        self,
        built: BuiltPipeline,
        *,
        stack: Stack,
        source_run: str,
        replaced: Mapping[str, Step] | None = None,
        copied_from: str | None = None,
    ) -> None:
        self.built = built
        self.source_run = source_run
        self.replaced: dict[str, Step] = dict(replaced or {})
        self.copied_from = copied_from
        self._stack = stack

    @classmethod
    def latest(cls, stack: Stack, pipeline: str) -> RecordedPipeline:
        """The pipeline as its latest run recorded it.

        Raises:
            NotFoundError: it has no run, or a code blob of it is missing.
        """
        row, built = load_recorded(stack, pipeline=pipeline)
        return cls(built, stack=stack, source_run=row.id)

    @property
    def name(self) -> str:
        return self.built.spec.name

    @property
    def spec(self) -> PipelineSpec:
        return self.built.spec

    @property
    def parameters(self) -> dict[str, Any]:
        """The pipeline parameters its steps were wired with."""
        return dict(self.built.spec.parameters)

    def __repr__(self) -> str:
        return f"RecordedPipeline({self.name!r}, run={self.source_run[:8]!r})"

    def copy(self, new_name: str, *, replace: Mapping[str, Any] | None = None) -> RecordedPipeline:
        """A copy named ``new_name``, with steps swapped: ``{"evaluate": evaluate_balanced}``.

        A replacement (a ``@step`` or ``@trainer``) takes the recorded step's place and wiring;
        the rest is unchanged, so the steps before it are cache hits on the recorded outputs.

        Raises:
            PipelineDefinitionError: the name is invalid, or a replacement does not fit.
        """
        from zenml_workers.sdk.pipeline import PipelineConfig

        Pipeline._check_config(PipelineConfig(name=new_name))
        built = self.built
        swaps = dict(replace or {})
        for inv, step in swaps.items():
            built = _swap(built, inv, step, new_name)
        built = BuiltPipeline(spec=_renamed(built.spec, new_name), code=built.code)
        return RecordedPipeline(
            built,
            stack=self._stack,
            source_run=self.source_run,
            replaced={**self.replaced, **swaps},
            copied_from=self.copied_from or self.name,
        )

    def build(self, **params: Any) -> BuiltPipeline:
        """The spec and code to run; ``params`` must be the recorded ones (its DAG is frozen).

        Raises:
            PipelineDefinitionError: a parameter is unknown or differs from the recorded value.
        """
        recorded = self.built.spec.parameters
        for key, value in params.items():
            if key not in recorded:
                raise PipelineDefinitionError(
                    f"recorded pipeline '{self.name}' has no parameter '{key}'; its parameters "
                    f"are {', '.join(recorded) or 'none'}"
                )
            if value != recorded[key]:
                raise PipelineDefinitionError(
                    f"recorded pipeline '{self.name}' was wired with {key}={recorded[key]!r} in "
                    f"run {self.source_run}; without the pipeline's source it runs only with its "
                    f"recorded parameters, so run the pipeline from its code to use {key}={value!r}"
                )
        return self.built

    def origin(self) -> dict[str, Any]:
        """What a run of this pipeline records as its origin (a copy or a rerun)."""
        if self.copied_from is not None:
            return {
                "kind": "copy",
                "pipeline": self.copied_from,
                "run_id": self.source_run,
                "replaced": sorted(self.replaced),
            }
        return {"kind": "rerun", "pipeline": self.name, "run_id": self.source_run}

    def submit(
        self, *, settings: Settings | None = None, run_name: str | None = None, **params: Any
    ) -> RunHandle:
        """Start a run and return at once; ``params`` as for :meth:`build`.

        Raises:
            PipelineDefinitionError: ``params`` differ from the recorded ones.
            ConfigurationError: a step's queue is unknown to the stack.
            MetadataStoreError: the metadata store cannot be reached.
        """
        from zenml_workers.sdk.runner import source_dir, submit_built

        built = self.build(**params)
        swapped = [s.entrypoint for s in self.replaced.values()]
        return submit_built(
            built,
            settings=settings or self._stack.settings,
            run_name=run_name,
            origin=self.origin(),
            code_dir=source_dir(swapped[0]) if swapped else None,
        )

    def __call__(self, **params: Any) -> RunView:
        """Run it and wait for the end, as calling a ``@pipeline`` does.

        Raises:
            StepFailedError: a step failed (see ``RunHandle.wait``).
        """
        return self.submit(**params).wait()


def _swap(built: BuiltPipeline, invocation_id: str, step: Any, pipeline_name: str) -> BuiltPipeline:
    new, blob = replace_step(built.spec, invocation_id, step, pipeline_name=pipeline_name)
    steps = tuple(new if s.invocation_id == invocation_id else s for s in built.spec.steps)
    used = {s.code_hash for s in steps}
    code = {h: b for h, b in built.code.items() if h in used}
    code.setdefault(blob.code_hash, blob)
    return BuiltPipeline(spec=replace(built.spec, steps=steps), code=code)


def _renamed(spec: PipelineSpec, name: str) -> PipelineSpec:
    return replace(spec, name=name)
