"""``@step`` and ``@trainer``: turn a typed function into a pipeline step.

The decorator validates the function when it decorates (every parameter
annotated, no ``*args``/``**kwargs``, unique output names) and reads its outputs
from the return annotation. The resulting :class:`Step` is still callable: outside
a pipeline build it just calls the function, so steps can be unit-tested alone;
inside a build it records an invocation and returns output placeholders.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Annotated, Any, TypeVar, get_args, get_origin, overload

from scheduler.specs import OutputSpec
from zenml_workers.errors import StepDefinitionError
from zenml_workers.sdk.graph import StepOutput, StepOutputs, current_build
from zenml_workers.sdk.names import name_problem
from zenml_workers.sdk.resources import Resources, resolve_queue, settings_to_json
from zenml_workers.sdk.source import CodeBlob, code_blob, function_source, source_hash

__all__ = ["Step", "StepConfig", "StepOutput", "StepOutputs", "step", "trainer"]

F = TypeVar("F", bound=Callable[..., Any])
#: Keywords a step call takes for itself, so no step parameter may use them.
RESERVED_PARAMETERS = ("id", "after")
_UNSET: Any = object()


@dataclass(frozen=True)
class StepConfig:
    """Decorator options of a step; ``enable_cache=None`` inherits the pipeline's."""

    name: str
    step_type: str = "step"
    enable_cache: bool | None = None
    retries: int = 0
    queue: str | None = None
    settings: dict[str, Any] | None = None
    resources: Resources | None = None
    timeout_s: float | None = None
    #: Seconds its outputs are offered as a cache hit after they are committed (None: always).
    cache_expires_after_s: float | None = None
    #: Whether it gets a run in the stack's experiment tracker (None: only a ``@trainer``).
    experiment_tracker: bool | None = None


def expiry_seconds(value: str | timedelta | float | None, step_name: str) -> float | None:
    """Seconds in ``cache_expires_after``: text such as ``"30m"``, ``"12h"``, ``"7d"`` (units
    s, m, h, d, w), a ``timedelta`` or a number of seconds; None stays None.

    Raises:
        StepDefinitionError: ``value`` is not a positive period.
    """
    if value is None:
        return None
    from stores.periods import seconds_in

    seconds = seconds_in(value)
    if seconds is None or not 0 < seconds < float("inf"):
        raise StepDefinitionError(
            f"step '{step_name}': cache_expires_after={value!r} must be a positive period such "
            "as '30m', '12h' or '7d' (s, m, h, d, w), a timedelta or a number of seconds"
        )
    return seconds


def _check_config(cfg: StepConfig) -> None:
    def bad(what: str) -> StepDefinitionError:
        return StepDefinitionError(f"step '{cfg.name}': {what}")

    if not isinstance(cfg.name, str) or not cfg.name:
        raise bad("name= must be a non-empty string; pass name='my_step' or leave it out")
    problem = name_problem(cfg.name, dots=False)
    if problem is not None:
        raise bad(f"the step name {problem}; pass another with name= (in @step or with_options)")
    if cfg.enable_cache is not None and not isinstance(cfg.enable_cache, bool):
        raise bad(f"enable_cache={cfg.enable_cache!r} must be True, False or None")
    if isinstance(cfg.retries, bool) or not isinstance(cfg.retries, int) or cfg.retries < 0:
        raise bad(f"retries={cfg.retries!r} must be a whole number of 0 or more")
    if cfg.queue is not None and (not isinstance(cfg.queue, str) or not cfg.queue):
        raise bad(f"queue={cfg.queue!r} must be a non-empty queue name such as 'cpu' or 'gpu'")
    if cfg.timeout_s is not None and (
        isinstance(cfg.timeout_s, bool)
        or not isinstance(cfg.timeout_s, (int, float))
        or cfg.timeout_s <= 0
    ):
        raise bad(f"timeout_s={cfg.timeout_s!r} must be a positive number of seconds or None")
    if cfg.cache_expires_after_s is not None:
        expiry_seconds(cfg.cache_expires_after_s, cfg.name)
    if cfg.experiment_tracker is not None and not isinstance(cfg.experiment_tracker, bool):
        raise bad(f"experiment_tracker={cfg.experiment_tracker!r} must be True, False or None")
    if cfg.settings is not None and not isinstance(cfg.settings, dict):
        raise bad(f"settings= must be a dict, not {type(cfg.settings).__name__}")
    try:
        settings_to_json(cfg.settings, cfg.resources)
    except (TypeError, ValueError) as e:
        raise bad(f"settings/resources must be JSON-able ({e}); use plain values") from e


def type_hints_of(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations; one that cannot be resolved stays a string (and is not type-checked)."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - any failure to evaluate falls back to one by one
        hints: dict[str, Any] = {}
        for name, ann in getattr(fn, "__annotations__", {}).items():
            try:
                hints[name] = eval(ann, fn.__globals__) if isinstance(ann, str) else ann  # noqa: S307
            except Exception:  # noqa: BLE001
                hints[name] = ann
        return hints


def _named(tp: Any) -> tuple[str | None, Any]:
    """``(name, inner type)`` of ``Annotated[T, "name"]``, or ``(None, tp)``."""
    if get_origin(tp) is Annotated:
        args = get_args(tp)
        names = [m for m in args[1:] if isinstance(m, str)]
        return (names[0] if names else None), args[0]
    return None, tp


def _check_output_name(step_name: str, name: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise StepDefinitionError(
            f"step '{step_name}': output name {name!r} {problem}; rename it in "
            "Annotated[..., 'name']"
        )


def parse_outputs(step_name: str, hints: dict[str, Any]) -> dict[str, Any]:
    """Output names and types from the return annotation, in order.

    No annotation gives one output ``"output"`` of Any; ``None`` gives none;
    ``Annotated[T, "name"]`` names it; ``tuple[A, B, ...]`` with two or more
    members gives one output per member (unnamed ones are ``output_<i>``).

    Raises:
        StepDefinitionError: when two outputs share a name, or a name is not a valid
            name (see :mod:`zenml_workers.sdk.names`).
    """
    if "return" not in hints:
        return {"output": Any}
    ret = hints["return"]
    if ret is None or ret is type(None):
        return {}
    if isinstance(ret, str):
        return {"output": Any}
    name, inner = _named(ret)
    if name is not None:
        _check_output_name(step_name, name)
        return {name: inner}
    args = get_args(inner) if get_origin(inner) is tuple else ()
    if len(args) < 2 or args[-1] is Ellipsis:
        return {"output": inner}
    outputs: dict[str, Any] = {}
    for i, member in enumerate(args):
        member_name, member_type = _named(member)
        if member_name is not None:
            _check_output_name(step_name, member_name)
        member_name = member_name or f"output_{i}"
        if member_name in outputs:
            raise StepDefinitionError(
                f"step '{step_name}': output name '{member_name}' is used twice in the return "
                f"annotation; give each tuple member its own Annotated[..., 'name']"
            )
        outputs[member_name] = member_type
    return outputs


class Step:
    """A validated step: the raw function plus its options, outputs and code identity."""

    def __init__(self, entrypoint: Callable[..., Any], config: StepConfig) -> None:
        label = getattr(entrypoint, "__name__", repr(entrypoint))
        if isinstance(entrypoint, Step):
            raise StepDefinitionError(
                f"'{label}' is already a step; use .with_options(...) to change its options"
            )
        if not inspect.isfunction(entrypoint):
            raise StepDefinitionError(
                f"@step must decorate a function, not {type(entrypoint).__name__} {label!r}; "
                f"put the logic in a def and decorate that"
            )
        if inspect.iscoroutinefunction(entrypoint):
            raise StepDefinitionError(
                f"step '{config.name}' is an async function; make it a plain def "
                f"(call asyncio.run inside it if needed)"
            )
        _check_config(config)
        self.entrypoint = entrypoint
        self.config = config
        self.signature = inspect.signature(entrypoint)
        self.type_hints = type_hints_of(entrypoint)
        for param in self.signature.parameters.values():
            self._check_parameter(param)
        self.output_types = parse_outputs(config.name, self.type_hints)
        self._source: str | None = None
        self._source_hash: str | None = None
        self._blob: CodeBlob | None = None
        self._output_specs: tuple[OutputSpec, ...] | None = None
        functools.update_wrapper(self, entrypoint)

    def _check_parameter(self, param: inspect.Parameter) -> None:
        where = f"step '{self.config.name}', parameter '{param.name}'"
        if param.kind is param.VAR_POSITIONAL or param.kind is param.VAR_KEYWORD:
            raise StepDefinitionError(
                f"{where}: *args and **kwargs are not supported; declare each input as a "
                f"named, annotated parameter"
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise StepDefinitionError(
                f"{where}: positional-only parameters are not supported; remove the '/'"
            )
        if param.name in RESERVED_PARAMETERS:
            raise StepDefinitionError(
                f"{where}: '{param.name}' is reserved for step calls (id=, after=); rename it"
            )
        if param.annotation is inspect.Parameter.empty:
            raise StepDefinitionError(
                f"{where} has no type annotation; annotate it, e.g. '{param.name}: int'"
            )

    # -- identity ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def step_type(self) -> str:
        return self.config.step_type

    @property
    def queue(self) -> str:
        """The queue this step goes to, before any pipeline-level settings apply."""
        c = self.config
        return resolve_queue(c.step_type, c.queue, c.resources, c.settings)

    @property
    def source(self) -> str:
        """The function's source without decorator lines, or ``""`` when it cannot be read."""
        if self._source is None:
            self._source = function_source(self.entrypoint)
        return self._source

    @property
    def source_hash(self) -> str:
        """``sha256:<hex>`` of :attr:`source` (of the bytecode when there is no source)."""
        if self._source_hash is None:
            self._source_hash = source_hash(self.entrypoint, self.source)
        return self._source_hash

    def code_blob(self) -> CodeBlob:
        """The pickled function as a :class:`CodeBlob`, computed once per Step object."""
        if self._blob is None:
            self._blob = code_blob(self.entrypoint, self.name, self.source)
        return self._blob

    def output_specs(self) -> tuple[OutputSpec, ...]:
        """The declared outputs with their type paths and build-time materializers."""
        if self._output_specs is None:
            from zenml_workers.sdk.materializers.registry import (
                materializer_for_type,
                materializer_path,
                type_path,
            )

            specs = []
            for out_name, tp in self.output_types.items():
                tp = Any if isinstance(tp, str) else tp
                materializer = materializer_for_type(tp)
                specs.append(
                    OutputSpec(
                        name=out_name,
                        type_path=type_path(tp),
                        materializer=materializer_path(materializer) if materializer else "",
                    )
                )
            self._output_specs = tuple(specs)
        return self._output_specs

    # -- options and calls ---------------------------------------------------------------------

    def with_options(
        self,
        *,
        enable_cache: bool | None = _UNSET,
        retries: int = _UNSET,
        queue: str | None = _UNSET,
        settings: dict[str, Any] | None = _UNSET,
        resources: Resources | None = _UNSET,
        timeout_s: float | None = _UNSET,
        name: str = _UNSET,
        cache_expires_after: str | timedelta | float | None = _UNSET,
        experiment_tracker: bool | None = _UNSET,
    ) -> Step:
        """A copy of this step with some options changed; ``settings`` are merged key by key.

        Raises:
            StepDefinitionError: when an option is invalid.
        """
        changes: dict[str, Any] = {
            k: v
            for k, v in {
                "enable_cache": enable_cache,
                "retries": retries,
                "queue": queue,
                "resources": resources,
                "timeout_s": timeout_s,
                "name": name,
                "experiment_tracker": experiment_tracker,
            }.items()
            if v is not _UNSET
        }
        if cache_expires_after is not _UNSET:
            label = self.name if name is _UNSET else name
            changes["cache_expires_after_s"] = expiry_seconds(cache_expires_after, label)
        if settings is not _UNSET:
            if settings is not None and not isinstance(settings, dict):
                raise StepDefinitionError(
                    f"step '{self.name}': settings= must be a dict, not {type(settings).__name__}"
                )
            changes["settings"] = {**(self.config.settings or {}), **(settings or {})}
        return Step(self.entrypoint, replace(self.config, **changes))

    def __call__(self, *args: Any, id: str | None = None, after: Any = None, **kwargs: Any) -> Any:
        """Outside a pipeline build, call the function; inside one, record an invocation.

        Inside a build, returns a :class:`StepOutput` (one output), a
        ``StepOutputs`` tuple (several, also indexable by name) or None (no outputs).

        Raises:
            PipelineDefinitionError: inside a build, for a wiring mistake.
            TypeError: outside a build, when ``id=`` or ``after=`` are given.
        """
        build = current_build()
        if build is None:
            if id is not None or after is not None:
                raise TypeError(
                    f"step '{self.name}' was called outside a pipeline, where id= and after= "
                    f"mean nothing; drop them or call the step inside a @pipeline function"
                )
            return self.entrypoint(*args, **kwargs)
        return build.invoke(self, args, kwargs, id, after)

    def __repr__(self) -> str:
        return f"Step({self.name!r}, step_type={self.step_type!r}, queue={self.queue!r})"


@overload
def step(fn: F, /) -> Step: ...
@overload
def step(
    *,
    enable_cache: bool | None = None,
    retries: int = 0,
    queue: str | None = None,
    settings: dict[str, Any] | None = None,
    resources: Resources | None = None,
    timeout_s: float | None = None,
    name: str | None = None,
    step_type: str = "step",
    cache_expires_after: str | timedelta | float | None = None,
    experiment_tracker: bool | None = None,
) -> Callable[[F], Step]: ...
def step(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    enable_cache: bool | None = None,
    retries: int = 0,
    queue: str | None = None,
    settings: dict[str, Any] | None = None,
    resources: Resources | None = None,
    timeout_s: float | None = None,
    name: str | None = None,
    step_type: str = "step",
    cache_expires_after: str | timedelta | float | None = None,
    experiment_tracker: bool | None = None,
) -> Step | Callable[[Callable[..., Any]], Step]:
    """Turn a typed function into a :class:`Step`, as ``@step`` or ``@step(retries=2, ...)``.

    Args:
        enable_cache: reuse outputs of an identical earlier run; None inherits the pipeline's.
        retries: extra attempts after a failure.
        queue: worker queue; default ``gpu`` for trainers and GPU resources, else ``cpu``.
        settings: free-form settings, ZenML-style (``{"resources": ResourceSettings(...)}``).
        resources: CPU/GPU/memory the step needs.
        timeout_s: seconds one attempt may run, or None for no limit.
        name: step name; default the function name.
        step_type: ``"step"`` or ``"trainer"`` (use ``@trainer`` for the latter).
        cache_expires_after: how long its outputs stay a cache hit after they are committed
            (ZenML's ``expires_after``): ``"7d"``, a ``timedelta`` or seconds; None: always.
        experiment_tracker: give it a run in the stack's experiment tracker (MLflow), with
            its parameters and the metrics it logs; None: only ``@trainer`` steps get one.

    Raises:
        StepDefinitionError: when the function or an option is invalid.
    """

    def decorate(f: Callable[..., Any]) -> Step:
        label = name if name is not None else getattr(f, "__name__", "")
        config = StepConfig(
            name=label,
            step_type=step_type,
            enable_cache=enable_cache,
            retries=retries,
            queue=queue,
            settings=settings,
            resources=resources,
            timeout_s=timeout_s,
            cache_expires_after_s=expiry_seconds(cache_expires_after, str(label)),
            experiment_tracker=experiment_tracker,
        )
        return Step(f, config)

    return decorate if fn is None else decorate(fn)


def trainer(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """``@step`` with ``step_type="trainer"``, so it goes to the ``gpu`` queue unless told otherwise.

    Raises:
        StepDefinitionError: when the function or an option is invalid.
    """
    options.setdefault("step_type", "trainer")
    return step(fn, **options) if fn is not None else step(**options)
