"""Wire formats: the pipeline and step specs and the step-task message.

Standard library only. These travel between the SDK, the scheduler and the
workers (in the metadata store as JSON, on the broker as task arguments), so
each carries a ``version`` and round-trips through ``encode``/``decode``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SPEC_VERSION = 1

#: Queue a step goes to unless it names another one.
DEFAULT_QUEUE = "cpu"
#: Queue for ``@trainer`` steps and steps that ask for a GPU.
GPU_QUEUE = "gpu"


def canonical_json(value: Any) -> str:
    """Serialise ``value`` so equal values give equal text (sorted keys, no spaces).

    Floats go through ``repr`` (shortest round-tripping form), so ``1.0`` and
    ``1.00`` agree; an integral float stays distinct from an int of the same value.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
    )


@dataclass(frozen=True)
class InputRef:
    """One upstream output feeding an input: the producing invocation and its output name."""

    step: str
    output: str


@dataclass(frozen=True)
class InputSpec:
    """A step input bound to one upstream output, or to a list of them (fan-in)."""

    name: str
    refs: tuple[InputRef, ...]
    is_list: bool = False


@dataclass(frozen=True)
class OutputSpec:
    """A declared step output.

    ``materializer`` is the ``module:Qualname`` of the materializer chosen from the
    annotation when the pipeline is built, or ``""`` when the annotation is too
    loose (``Any``) and the value's type decides at run time.
    """

    name: str
    type_path: str
    materializer: str = ""


@dataclass(frozen=True)
class StepSpec:
    """One invocation of a step inside a pipeline."""

    invocation_id: str
    name: str
    code_hash: str
    source_hash: str
    inputs: tuple[InputSpec, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    upstream: tuple[str, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    queue: str = DEFAULT_QUEUE
    step_type: str = "step"
    enable_cache: bool = True
    retries: int = 0
    timeout_s: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    #: Its outputs stop being offered as a cache hit this long after they were committed
    #: (``@step(cache_expires_after="7d")``); None: never.
    cache_expires_after_s: float | None = None
    #: Whether the step gets an experiment-tracker run (None: ``@trainer`` steps do, others not).
    experiment_tracker: bool | None = None

    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepSpec:
        return cls(
            invocation_id=d["invocation_id"],
            name=d["name"],
            code_hash=d["code_hash"],
            source_hash=d["source_hash"],
            inputs=tuple(
                InputSpec(
                    name=i["name"],
                    refs=tuple(InputRef(**r) for r in i["refs"]),
                    is_list=i.get("is_list", False),
                )
                for i in d.get("inputs", ())
            ),
            parameters=dict(d.get("parameters", {})),
            upstream=tuple(d.get("upstream", ())),
            outputs=tuple(OutputSpec(**o) for o in d.get("outputs", ())),
            queue=d.get("queue", DEFAULT_QUEUE),
            step_type=d.get("step_type", "step"),
            enable_cache=d.get("enable_cache", True),
            retries=d.get("retries", 0),
            timeout_s=d.get("timeout_s"),
            settings=dict(d.get("settings", {})),
            cache_expires_after_s=d.get("cache_expires_after_s"),
            experiment_tracker=d.get("experiment_tracker"),
        )


@dataclass(frozen=True)
class PipelineSpec:
    """A built pipeline: its steps in topological order, with their wiring."""

    name: str
    steps: tuple[StepSpec, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    enable_cache: bool = True
    version: int = SPEC_VERSION

    def step(self, invocation_id: str) -> StepSpec:
        for s in self.steps:
            if s.invocation_id == invocation_id:
                return s
        raise KeyError(invocation_id)

    def by_id(self) -> dict[str, StepSpec]:
        return {s.invocation_id: s for s in self.steps}

    def downstream(self) -> dict[str, tuple[str, ...]]:
        """Map each invocation id to the invocations that wait on it."""
        out: dict[str, list[str]] = {s.invocation_id: [] for s in self.steps}
        for s in self.steps:
            for up in s.upstream:
                out[up].append(s.invocation_id)
        return {k: tuple(v) for k, v in out.items()}

    def encode(self) -> str:
        return canonical_json(asdict(self))

    @classmethod
    def decode(cls, text: str) -> PipelineSpec:
        d = json.loads(text)
        if d.get("version", 1) > SPEC_VERSION:
            raise ValueError(
                f"pipeline spec version {d['version']} is newer than this release understands "
                f"({SPEC_VERSION}); upgrade zenml-workers on this machine"
            )
        return cls(
            name=d["name"],
            steps=tuple(StepSpec.from_dict(s) for s in d["steps"]),
            parameters=dict(d.get("parameters", {})),
            enable_cache=d.get("enable_cache", True),
            version=d.get("version", SPEC_VERSION),
        )


@dataclass(frozen=True)
class StepTask:
    """The broker message for one step attempt. Everything else is read from the SQL store.

    ``inputs`` optionally carries the step's input artifacts (``{step, output, id, uri,
    materializer, data_type, content_hash}`` each), known to the transaction
    that queued it; artifacts are immutable, so the worker can skip reading them back.

    ``store_id`` names the metadata store the step was planned in (its ``store_info`` id) and
    ``store_url`` is that store's URL with its secrets hidden, so a worker connected to
    another store refuses the message by naming both stores instead of failing to find the
    run. Both are inside the signed body; a message without them (an older client) is run
    unchecked.
    """

    run_id: str
    step_run_id: str
    invocation_id: str
    pipeline: str
    inputs: list[dict[str, str]] | None = None
    store_id: str = ""
    store_url: str = ""
    version: int = SPEC_VERSION

    def encode(self) -> dict[str, Any]:
        d = asdict(self)
        if self.inputs is None:
            del d["inputs"]
        for optional in ("store_id", "store_url"):
            if not d[optional]:
                del d[optional]  # an older worker's message stays byte-identical
        return d

    @classmethod
    def decode(cls, d: dict[str, Any]) -> StepTask:
        return cls(
            run_id=d["run_id"],
            step_run_id=d["step_run_id"],
            invocation_id=d["invocation_id"],
            pipeline=d.get("pipeline", ""),
            inputs=d.get("inputs"),
            store_id=str(d.get("store_id") or ""),
            store_url=str(d.get("store_url") or ""),
            version=d.get("version", SPEC_VERSION),
        )
