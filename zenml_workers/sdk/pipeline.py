"""``@pipeline``: a function whose step calls define a DAG, built into a ``PipelineSpec``.

``Pipeline.build(**params)`` runs the function inside a build context (see
:mod:`zenml_workers.sdk.graph`), so every wiring mistake surfaces there as a
:class:`~zenml_workers.errors.PipelineDefinitionError` before anything runs.
Calling the pipeline (``training(rows=200)``) builds and runs it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar, overload

from scheduler.specs import PipelineSpec, canonical_json
from zenml_workers.errors import PipelineDefinitionError
from zenml_workers.sdk.annotations import admits_none, describe_type, value_matches
from zenml_workers.sdk.graph import BuildContext, build_context, current_build
from zenml_workers.sdk.names import name_problem
from zenml_workers.sdk.resources import settings_to_json
from zenml_workers.sdk.source import CodeBlob
from zenml_workers.sdk.step import type_hints_of

__all__ = ["BuiltPipeline", "Pipeline", "PipelineConfig", "pipeline"]

F = TypeVar("F", bound=Callable[..., Any])
_UNSET: Any = object()


@dataclass(frozen=True)
class BuiltPipeline:
    """A built pipeline: its frozen spec and the distinct code blobs its steps need, by code hash."""

    spec: PipelineSpec
    code: dict[str, CodeBlob]


@dataclass(frozen=True)
class PipelineConfig:
    """Decorator options of a pipeline; ``settings`` are defaults for every step's settings."""

    name: str
    enable_cache: bool = True
    settings: dict[str, Any] | None = None


class Pipeline:
    """A validated pipeline function plus its options."""

    def __init__(self, entrypoint: Callable[..., Any], config: PipelineConfig) -> None:
        label = getattr(entrypoint, "__name__", repr(entrypoint))
        if not inspect.isfunction(entrypoint):
            raise PipelineDefinitionError(
                f"@pipeline must decorate a function, not {type(entrypoint).__name__} "
                f"{label!r}; put the step calls in a def and decorate that"
            )
        self._check_config(config)
        self.entrypoint = entrypoint
        self.config = config
        self.signature = inspect.signature(entrypoint)
        self.type_hints = type_hints_of(entrypoint)
        for p in self.signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise PipelineDefinitionError(
                    f"pipeline '{config.name}', parameter '{p.name}': *args, **kwargs and "
                    f"positional-only parameters are not supported; declare named parameters"
                )
        functools.update_wrapper(self, entrypoint)

    @staticmethod
    def _check_config(config: PipelineConfig) -> None:
        if not isinstance(config.name, str) or not config.name:
            raise PipelineDefinitionError(
                "a pipeline name must be a non-empty string; pass name='my_pipeline' or leave it out"
            )
        problem = name_problem(config.name)
        if problem is not None:
            raise PipelineDefinitionError(
                f"pipeline {config.name!r}: the name {problem}; pass another one with "
                "@pipeline(name=...)"
            )
        if not isinstance(config.enable_cache, bool):
            raise PipelineDefinitionError(
                f"pipeline '{config.name}': enable_cache={config.enable_cache!r} must be True or False"
            )
        if config.settings is not None and not isinstance(config.settings, dict):
            raise PipelineDefinitionError(
                f"pipeline '{config.name}': settings= must be a dict, not "
                f"{type(config.settings).__name__}"
            )
        try:
            settings_to_json(config.settings)
        except (TypeError, ValueError) as e:
            raise PipelineDefinitionError(
                f"pipeline '{config.name}': settings must be JSON-able ({e}); use plain values"
            ) from e

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def enable_cache(self) -> bool:
        return self.config.enable_cache

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.config.settings or {})

    def with_options(
        self,
        *,
        enable_cache: bool | None = _UNSET,
        name: str = _UNSET,
        settings: dict[str, Any] | None = _UNSET,
    ) -> Pipeline:
        """A copy of this pipeline with some options changed; ``settings`` are merged key by key.

        Raises:
            PipelineDefinitionError: when an option is invalid.
        """
        changes: dict[str, Any] = {}
        if enable_cache is not _UNSET:
            changes["enable_cache"] = True if enable_cache is None else enable_cache
        if name is not _UNSET:
            changes["name"] = name
        if settings is not _UNSET:
            if settings is not None and not isinstance(settings, dict):
                raise PipelineDefinitionError(
                    f"pipeline '{self.name}': settings= must be a dict, not "
                    f"{type(settings).__name__}"
                )
            changes["settings"] = {**self.settings, **(settings or {})}
        return Pipeline(self.entrypoint, replace(self.config, **changes))

    def _positional_error(self, args: tuple[Any, ...]) -> PipelineDefinitionError:
        names = list(self.signature.parameters)
        example = ", ".join(f"{n}=..." for n in names[: max(1, len(args))]) or "..."
        return PipelineDefinitionError(
            f"pipeline '{self.name}' got {len(args)} positional argument(s); pass parameters "
            f"by keyword, e.g. {self.name}({example})"
        )

    def resolve_parameters(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check ``params`` against the function signature and fill in defaults.

        Returns:
            ``(values, recorded)``: the Python values to call the function with, and
            their JSON form (defaults included) for ``PipelineSpec.parameters``.

        Raises:
            PipelineDefinitionError: for an unknown, missing, non-JSON or mistyped parameter.
        """
        sig = self.signature.parameters
        for key in params:
            if key not in sig:
                raise PipelineDefinitionError(
                    f"pipeline '{self.name}' has no parameter '{key}'; its parameters are "
                    f"{', '.join(sig) or 'none'}"
                )
        values: dict[str, Any] = {}
        recorded: dict[str, Any] = {}
        for name, p in sig.items():
            if name not in params:
                if p.default is inspect.Parameter.empty:
                    raise PipelineDefinitionError(
                        f"pipeline '{self.name}' is missing required parameter '{name}'; "
                        f"pass {name}=... when building or running it"
                    )
                values[name] = p.default
                # A default that is not JSON stays the function's own business.
                with contextlib.suppress(TypeError, ValueError):
                    recorded[name] = json.loads(canonical_json(p.default))
                continue
            value = params[name]
            try:
                recorded[name] = json.loads(canonical_json(value))
            except (TypeError, ValueError) as e:
                raise PipelineDefinitionError(
                    f"pipeline '{self.name}', parameter '{name}': a {type(value).__name__} is not "
                    f"JSON ({e}); pass JSON-able values and load anything bigger in a step"
                ) from e
            annotation = self.type_hints.get(name, Any)
            ok = value_matches(value, annotation)
            if ok is None and value is None:
                ok = admits_none(annotation) or p.default is None
            if ok is False and not (value is None and p.default is None):
                expected = describe_type(annotation)
                raise PipelineDefinitionError(
                    f"pipeline '{self.name}', parameter '{name}' expects {expected} but got "
                    f"{type(value).__name__} {value!r}; pass a {expected}"
                )
            values[name] = value
        return values, recorded

    def build(self, *args: Any, **params: Any) -> BuiltPipeline:
        """Run the pipeline function in a build context and freeze the resulting DAG.

        Returns:
            The spec (steps in topological order, ties in call order) and the code blobs.

        Raises:
            PipelineDefinitionError: for positional arguments, bad parameters or any
                wiring mistake in the function body.
        """
        if args:
            raise self._positional_error(args)
        values, recorded = self.resolve_parameters(params)
        context = BuildContext(self.name, self.enable_cache, self.settings)
        with build_context(context):
            self.entrypoint(**values)
        steps, code = context.finalize()
        if not steps:
            raise PipelineDefinitionError(
                f"pipeline '{self.name}' calls no steps; call at least one @step inside it"
            )
        spec = PipelineSpec(
            name=self.name, steps=steps, parameters=recorded, enable_cache=self.enable_cache
        )
        return BuiltPipeline(spec=spec, code=code)

    def __call__(self, *args: Any, **params: Any) -> Any:
        """Build and run the pipeline with ``params``; see ``zenml_workers.sdk.runner``.

        Raises:
            PipelineDefinitionError: for positional arguments or when called inside another
                pipeline's body.
        """
        if args:
            raise self._positional_error(args)
        outer = current_build()
        if outer is not None:
            raise PipelineDefinitionError(
                f"pipeline '{self.name}' was called inside pipeline '{outer.pipeline_name}'; "
                f"pipelines do not nest, so call its steps directly instead"
            )
        from zenml_workers.sdk.runner import run_pipeline

        return run_pipeline(self, params)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r})"


@overload
def pipeline(fn: F, /) -> Pipeline: ...
@overload
def pipeline(
    *, enable_cache: bool = True, name: str | None = None, settings: dict[str, Any] | None = None
) -> Callable[[F], Pipeline]: ...
def pipeline(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    enable_cache: bool = True,
    name: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Pipeline | Callable[[Callable[..., Any]], Pipeline]:
    """Turn a function of step calls into a :class:`Pipeline`, as ``@pipeline`` or ``@pipeline(...)``.

    Args:
        enable_cache: default for steps that do not set their own ``enable_cache``.
        name: pipeline name; default the function name.
        settings: defaults for every step's settings (a step's own keys win).

    Raises:
        PipelineDefinitionError: when the function or an option is invalid.
    """

    def decorate(f: Callable[..., Any]) -> Pipeline:
        config = PipelineConfig(
            name=name if name is not None else getattr(f, "__name__", ""),
            enable_cache=enable_cache,
            settings=settings,
        )
        return Pipeline(f, config)

    return decorate if fn is None else decorate(fn)
