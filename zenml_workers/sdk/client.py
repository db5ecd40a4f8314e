"""Read runs, steps and artifacts from the shared metadata store.

Views are frozen dataclasses built from the rows, so the schema can change
without breaking users. Everyone on a stack sees everyone's runs and can load
their artifacts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from scheduler.specs import PipelineSpec
from zenml_workers.components.client import TrackerRun, TrackingMixin
from zenml_workers.errors import ArtifactIntegrityError, NotFoundError
from zenml_workers.sdk.cache_admin import CacheMixin
from zenml_workers.sdk.reproduce import ReproduceMixin
from zenml_workers.sdk.resources import RunCost, StepCost, UsageRow
from zenml_workers.sdk.stack import Stack, get_stack
from zenml_workers.sdk.stacks import StacksMixin
from zenml_workers.sdk.step_logs import LogsMixin

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    from zenml_workers.sdk.recorded import RecordedPipeline
    from zenml_workers.sdk.runner import RunHandle
    from zenml_workers.settings import Settings


@dataclass(frozen=True)
class ArtifactView:
    """An immutable, content-hashed artifact and where it came from."""

    id: str
    name: str
    uri: str
    data_type: str
    materializer: str
    content_hash: str
    size_bytes: int
    metadata: Mapping[str, Any]
    producer_run_id: str
    producer_step_run_id: str
    created_at: float
    _stack: Stack = field(repr=False, compare=False)

    def load(self) -> Any:
        """Load the value with the materializer that saved it, checking every byte read
        against the hash and size recorded when it was written.

        Raises:
            ArtifactIntegrityError: the stored bytes changed since (flipped, truncated,
                replaced); the artifact is then marked corrupt, so caching skips it.
            ArtifactNotFoundError: the object is gone from the artifact store.
            MaterializerError: its materializer cannot be imported here.
        """
        from zenml_workers.sdk.materializers.registry import load_materializer, resolve_type

        store = _store_for(self._stack, self.uri)
        materializer = load_materializer(self.materializer)()
        try:
            with store.verified_reader(
                self.uri, expected_hash=self.content_hash, expected_size_bytes=self.size_bytes
            ) as fp:
                return materializer.load(fp, resolve_type(self.data_type))
        except ArtifactIntegrityError as e:
            raise self._record_corrupt(e) from e.__cause__

    def _record_corrupt(self, e: ArtifactIntegrityError) -> ArtifactIntegrityError:
        """Name this artifact in ``e`` and mark it corrupt (best effort) so caching skips it."""
        import logging
        import time

        from stores.metadata import queries as q

        named = e.with_origin(artifact_id=self.id, artifact_name=self.name)
        try:
            with self._stack.metadata.transaction() as s:
                origin = q.mark_artifact_corrupt(s, self.id, now=time.time())
        except Exception:  # the load fails on the corrupt bytes either way
            logging.getLogger("zenml_workers.client").warning(
                "could not mark artifact %s corrupt", self.id, exc_info=True
            )
            return named.with_origin(run_id=self.producer_run_id)
        if origin is None:
            return named.with_origin(run_id=self.producer_run_id)
        run_id, invocation_id = origin
        return named.with_origin(run_id=run_id, step=invocation_id, recorded=True)


@dataclass(frozen=True)
class StepRunView:
    """One step invocation of a run."""

    id: str
    run_id: str
    invocation_id: str
    name: str
    status: str
    queue: str
    attempt: int
    worker_host: str | None
    worker_pid: int | None
    started_at: float | None
    ended_at: float | None
    cache_key: str | None
    cached_from_run_id: str | None
    exception: str
    traceback: str
    outputs: Mapping[str, ArtifactView]
    inputs: Mapping[str, ArtifactView | list[ArtifactView]]
    metadata: Mapping[str, Any]
    #: What it cost (CPU-, GPU- and wall-seconds, its GPUs) or, for a cache hit, saved.
    cost: StepCost = field(default_factory=StepCost)
    _stored_logs: str = field(default="", repr=False, compare=False)
    _client: Client | None = field(default=None, repr=False, compare=False)

    @cached_property
    def logs(self) -> str:
        """Captured stdout, stderr and logging of its latest attempt, as stored when first read
        (a running step's lines arrive about every half second; see :meth:`Client.logs`)."""
        if self._client is None:
            return self._stored_logs
        return self._client._text_of(self.id, None)

    @property
    def output(self) -> ArtifactView:
        """The single output of a step that has exactly one.

        Raises:
            ValueError: the step has no output or several (use ``outputs[name]``).
        """
        if len(self.outputs) != 1:
            raise ValueError(
                f"step {self.invocation_id!r} has {len(self.outputs)} outputs ({', '.join(self.outputs)}); "
                "use .outputs[name]"
            )
        return next(iter(self.outputs.values()))

    @property
    def is_cached(self) -> bool:
        return self.status == "cached"

    @property
    def tracker(self) -> TrackerRun | None:
        """Its run in the stack's experiment tracker (``.run_id`` is the MLflow run id), or
        None for a step that was not tracked."""
        return TrackerRun.of(self.metadata)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at


@dataclass(frozen=True)
class RunView:
    """A pipeline run with its steps, configuration and captured environment."""

    id: str
    name: str
    pipeline: str
    status: str
    user: str
    orchestrator: str
    created_at: float
    ended_at: float | None
    message: str
    config: Mapping[str, Any]
    environment: Mapping[str, Any]
    steps: Mapping[str, StepRunView]
    #: What it came from: ``{"kind": "retry" | "rerun" | "copy", "run_id": ..., ...}``, or None.
    origin: Mapping[str, Any] | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.created_at

    def __repr__(self) -> str:
        # One line, not every step, artifact and package (what a notebook cell would show).
        from zenml_workers.sdk.progress import run_summary

        return run_summary(self)

    def _repr_html_(self) -> str:
        from zenml_workers.sdk.progress import run_summary_html

        return run_summary_html(self)

    @property
    def cost(self) -> RunCost:
        """What its steps cost, failed attempts included, and what its cache hits saved."""
        return RunCost.of(st.cost for st in self.steps.values())


@dataclass(frozen=True)
class PipelineView:
    """A pipeline by name, with access to its runs."""

    id: str
    name: str
    _client: Client = field(repr=False, compare=False)

    @property
    def runs(self) -> list[RunView]:
        """Runs of this pipeline, newest first (at most 50)."""
        return self._client.list_runs(pipeline=self.name)

    @property
    def last_run(self) -> RunView:
        runs = self._client.list_runs(pipeline=self.name, limit=1)
        if not runs:
            raise NotFoundError(f"pipeline {self.name!r} has no runs yet")
        return runs[0]

    def recorded(self) -> RecordedPipeline:
        """The pipeline as its latest run recorded it (spec and code, no source needed).

        Raises:
            NotFoundError: it has no run yet, or its code is missing from the store.
        """
        from zenml_workers.sdk.recorded import RecordedPipeline

        return RecordedPipeline.latest(self._client._stack, self.name)

    def copy(self, new_name: str, *, replace: Mapping[str, Any] | None = None) -> RecordedPipeline:
        """A copy named ``new_name`` with steps swapped (``{"evaluate": evaluate_balanced}``),
        from the latest run's spec and code; see :meth:`RecordedPipeline.copy`.

        Raises:
            PipelineDefinitionError: a replacement's signature does not fit the wiring.
        """
        return self.recorded().copy(new_name, replace=replace)

    def submit(self, **params: Any) -> RunHandle:
        """Run it again from its latest recorded spec and code and return at once."""
        return self.recorded().submit(**params)

    def __call__(self, **params: Any) -> RunView:
        """Run it again from its latest recorded spec and code and wait for the end."""
        return self.recorded()(**params)


class Client(LogsMixin, StacksMixin, CacheMixin, ReproduceMixin, TrackingMixin):
    """Entry point to everything recorded on a stack.

    Team features live in mixins of their own modules: shared stacks (``sdk/stacks.py``),
    cache management (``sdk/cache_admin.py``), retry/rerun/diff and pipeline copies
    (``sdk/reproduce.py``) and experiment trackers (``components/``).

    Args:
        settings: the stack to read (default: ``ZW_*`` environment / stack file).
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._stack = get_stack(settings)

    def get_pipeline(self, name: str) -> PipelineView:
        from stores.metadata import queries as q

        with self._stack.metadata.read() as s:
            row = q.get_pipeline(s, name)
        return PipelineView(id=row.id, name=row.name, _client=self)

    def list_pipelines(self) -> list[str]:
        from stores.metadata import queries as q

        with self._stack.metadata.read() as s:
            return [p.name for p in q.list_pipelines(s)]

    def list_runs(
        self, *, pipeline: str | None = None, user: str | None = None, limit: int = 50
    ) -> list[RunView]:
        """The newest runs first, of one pipeline and/or one user (``ZW_USER`` or the login
        name of whoever submitted) when given."""
        from stores.metadata import queries as q

        with self._stack.metadata.read() as s:
            ids = [r.id for r in q.list_runs(s, pipeline=pipeline, user=user, limit=limit)]
        return [self.get_run(i) for i in ids]

    def get_run(self, run_id: str) -> RunView:
        """The run with this id (a unique prefix of it is enough).

        Raises:
            NotFoundError: no run has this id.
        """
        from sqlalchemy import select

        from stores.metadata import queries as q
        from stores.metadata import usage
        from stores.metadata.models import RunRow

        with self._stack.metadata.read() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                matches = list(
                    s.execute(select(RunRow).where(RunRow.id.like(f"{run_id}%")).limit(2)).scalars()
                )
                if len(matches) != 1:
                    raise NotFoundError(f"no run with id {run_id!r}; list runs with `zw runs`")
                row = matches[0]
            # Core rows, not ORM objects: a 1,000-step run loads in milliseconds.
            conn = s.connection()
            steps = conn.execute(
                select(q.STEPS).where(q.STEPS.c.run_id == row.id).order_by(q.STEPS.c.position)
            ).all()
            originals = usage.records_of(
                s, [st.cached_from_step_run_id for st in steps if st.cached_from_step_run_id]
            )
            edges = conn.execute(
                select(
                    q.LINEAGE.c.step_run_id.label("l_step_run_id"),
                    q.LINEAGE.c.direction.label("l_direction"),
                    q.LINEAGE.c.name.label("l_name"),
                    q.ARTIFACTS,
                )
                .join(q.ARTIFACTS, q.ARTIFACTS.c.id == q.LINEAGE.c.artifact_id)
                .where(q.LINEAGE.c.run_id == row.id)
                .order_by(q.LINEAGE.c.position)
            ).all()
        outputs: dict[str, dict[str, ArtifactView]] = {}
        inputs: dict[str, dict[str, Any]] = {}
        spec = PipelineSpec.decode(row.spec)
        list_inputs = _list_inputs(spec, {st.id: st.invocation_id for st in steps})
        order = {st.invocation_id: st.output_names() for st in spec.steps}
        views: dict[str, ArtifactView] = {}
        for edge in edges:
            view = views.get(edge.id) or views.setdefault(edge.id, self._artifact_view(edge))
            if edge.l_direction == "output":
                outputs.setdefault(edge.l_step_run_id, {})[edge.l_name] = view
            else:
                bucket = inputs.setdefault(edge.l_step_run_id, {})
                if (edge.l_step_run_id, edge.l_name) in list_inputs:
                    bucket.setdefault(edge.l_name, []).append(view)
                else:
                    bucket[edge.l_name] = view
        step_views = {
            st.invocation_id: StepRunView(
                id=st.id,
                run_id=st.run_id,
                invocation_id=st.invocation_id,
                name=st.step_name,
                status=st.status,
                queue=st.queue,
                attempt=st.attempt,
                worker_host=st.worker_host,
                worker_pid=st.worker_pid,
                started_at=st.started_at,
                ended_at=st.ended_at,
                cache_key=st.cache_key,
                cached_from_run_id=st.cached_from_run_id,
                _stored_logs=st.logs or "",
                _client=self,
                exception=st.exception or "",
                traceback=st.traceback or "",
                outputs=MappingProxyType(
                    _ordered(outputs.get(st.id, {}), order.get(st.invocation_id, ()))
                ),
                inputs=MappingProxyType(inputs.get(st.id, {})),
                metadata=MappingProxyType(dict(st.step_metadata or {})),
                cost=StepCost.from_records(
                    usage.UsageRecord.of(st.step_metadata),
                    originals.get(st.cached_from_step_run_id or ""),
                ),
            )
            for st in steps
        }
        return RunView(
            id=row.id,
            name=row.name,
            pipeline=row.pipeline_name,
            status=row.status,
            user=row.user,
            orchestrator=row.orchestrator,
            created_at=row.created_at,
            ended_at=row.ended_at,
            message=row.message or "",
            config=MappingProxyType(dict(row.config or {})),
            environment=MappingProxyType(dict(row.environment or {})),
            steps=MappingProxyType(step_views),
            origin=MappingProxyType(dict(row.origin)) if row.origin else None,
        )

    def usage(
        self,
        since: str | timedelta | datetime = "7d",
        by: str = "user",
        *,
        now: float | None = None,
    ) -> list[UsageRow]:
        """CPU-, GPU- and wall-seconds spent, and saved by cache hits, per user, pipeline or run.

        Args:
            since: the period: ``"30m"``, ``"12h"``, ``"7d"`` (units s, m, h, d, w) or a
                ``timedelta`` back from ``now``, or a ``datetime`` (naive means UTC). A step run
                counts when it ended in the period (or started in it and has not ended).
            by: ``"user"``, ``"pipeline"`` or ``"run"``.
            now: the end of the period, epoch seconds (default: the clock).

        Returns:
            One :class:`UsageRow` per group, the most GPU-seconds first (then CPU-seconds).

        Raises:
            ValueError: ``since`` or ``by`` is not understood.
        """
        import time

        from stores.metadata import usage

        start = _period_start(since, time.time() if now is None else now)
        with self._stack.metadata.read() as s:
            totals = usage.usage_by(s, by=by, since=start)
        return [UsageRow.from_totals(t) for t in totals]

    def get_artifact(self, artifact_id: str) -> ArtifactView:
        from stores.metadata import queries as q

        with self._stack.metadata.read() as s:
            return self._artifact_view(q.get_artifact(s, artifact_id))

    def explain_cache(self, run: str | RunView, step: str) -> list[str]:
        """Why ``step`` of ``run`` was (or was not) a cache hit, as sentences.

        Compares the step's cache ingredients with the closest earlier run of the
        same step in the same pipeline and names every ingredient that changed.
        """
        from scheduler import cache
        from stores.metadata import queries as q
        from stores.metadata.models import StepRunRow

        run_view = run if isinstance(run, RunView) else self.get_run(run)
        if step not in run_view.steps:
            raise NotFoundError(
                f"run {run_view.id} has no step {step!r}; its steps are {', '.join(run_view.steps)}"
            )
        sv = run_view.steps[step]
        with self._stack.metadata.read() as s:
            row = s.get(StepRunRow, sv.id)
            assert row is not None
            if row.status == "cached":
                return [f"cache hit: reused the outputs of run {row.cached_from_run_id}"]
            owner = s.get(StepRunRow, row.waits_for) if row.status == "waiting" else None
            if owner is not None:
                return [
                    f"waiting for run {owner.run_id} step {owner.invocation_id}, which computes "
                    "the same cache key; its outputs are reused when it commits"
                ]
            if not row.cache_ingredients:
                return ["the step never became ready, so no cache key was computed"]
            previous = q.previous_step_runs(
                s, pipeline_name=run_view.pipeline, invocation_id=step, before=run_view.created_at
            )
        current = row.cache_ingredients
        if previous and not _enabled(run_view, step):
            return ["caching is disabled for this step"]
        best = min(
            previous, key=lambda p: len(cache.explain(p.cache_ingredients, current)), default=None
        )
        reasons = cache.explain(best.cache_ingredients if best else None, current)
        if not reasons:
            from zenml_workers.sdk.cache_admin import why_not_offered

            at = row.queued_at or run_view.created_at  # when its cache hit was decided
            return [why_not_offered(self._stack, row.cache_key or "", at=at)]
        return reasons

    def _artifact_view(self, art: Any) -> ArtifactView:
        return ArtifactView(
            id=art.id,
            name=art.name,
            uri=art.uri,
            data_type=art.data_type,
            materializer=art.materializer,
            content_hash=art.content_hash,
            size_bytes=art.size_bytes,
            metadata=MappingProxyType(dict(art.artifact_metadata or {})),
            producer_run_id=art.producer_run_id,
            producer_step_run_id=art.producer_step_run_id,
            created_at=art.created_at,
            _stack=self._stack,
        )


def _period_start(since: str | timedelta | datetime, now: float) -> float:
    """Epoch seconds where the period ``since`` (see :meth:`Client.usage`) starts."""
    from datetime import UTC, datetime, timedelta

    from stores.periods import parse_period

    if isinstance(since, datetime):
        return (since if since.tzinfo else since.replace(tzinfo=UTC)).timestamp()
    if isinstance(since, timedelta):
        return now - since.total_seconds()
    if isinstance(since, str):
        return now - parse_period(since)
    raise ValueError(
        f"usage period {since!r} is not understood; give text such as '7d', a timedelta "
        "or a datetime"
    )


def _enabled(run: RunView, step: str) -> bool:
    return bool(run.config.get("steps", {}).get(step, {}).get("enable_cache", True))


def _ordered(outputs: dict[str, ArtifactView], names: tuple[str, ...]) -> dict[str, ArtifactView]:
    """Outputs in the order the step declares them."""
    return {n: outputs[n] for n in names if n in outputs} | outputs


def _list_inputs(spec: PipelineSpec, invocation_of: dict[str, str]) -> set[tuple[str, str]]:
    """(step run id, input name) of fan-in inputs: lineage rows do not say, the spec does."""
    by_inv = {st.invocation_id: {i.name for i in st.inputs if i.is_list} for st in spec.steps}
    return {(sr, name) for sr, inv in invocation_of.items() for name in by_inv.get(inv, ())}


def _store_for(stack: Stack, uri: str) -> Any:
    from stores.artifacts import artifact_store_from_uri

    if uri.split("://", 1)[0] == stack.artifacts.root_uri.split("://", 1)[0]:
        return stack.artifacts
    root = uri.rsplit("/", 1)[0]
    return artifact_store_from_uri(root, **stack.settings.s3_options())
