"""Run one step attempt: claim, load inputs, run, store outputs, commit. No Celery here.

The embedded default's worker processes and the Celery workers both call
:func:`execute_step`; the only difference is how the returned follow-up tasks
are sent. Two write transactions per step sit on the critical path: the claim
and the commit (which also settles and queues the downstream steps).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, BinaryIO, cast

from scheduler import dispatch
from scheduler.backoff import Backoff, call_with_backoff, retry_delay_s
from scheduler.dispatch import QueuedStep
from scheduler.lease import LeasePolicy, Redelivery
from scheduler.specs import StepSpec, StepTask
from stores.artifacts import ArtifactStore
from stores.errors import ArtifactIntegrityError, ArtifactStoreError, InfrastructureError
from stores.metadata import queries as q
from stores.metadata.store import MetadataStore
from zenml_workers.errors import CodeIntegrityError, MaterializerError, UntrustedInputError
from zenml_workers.worker.context import WorkerContext, pid_alive
from zenml_workers.worker.logcapture import capture_logs

log = logging.getLogger("zenml_workers.worker")


def execute_step(task: StepTask, ctx: WorkerContext) -> list[QueuedStep]:
    """Run one attempt of a queued step and return the follow-up tasks to send.

    Returns ``[]`` when the step was already taken, cancelled or superseded: a
    duplicate delivery is dropped here, so the broker may redeliver freely. A message
    for a step whose previous attempt's process is provably dead takes it over.

    Raises:
        InfrastructureError: the metadata store stayed unreachable for the whole retry
            budget while claiming or committing; nothing was marked failed, and the caller
            gives the message back to the broker.
        UntrustedInputError: the message names an artifact outside the stack's artifact
            store; nothing was claimed.
    """
    backoff = ctx.settings.infra_backoff()
    what = f"run {task.run_id} step {task.invocation_id}"
    carried = _carried_inputs(task)
    if carried is not None:
        # Refused before the claim: a bad message must not touch its run.
        check_trusted(carried.values(), ctx, materializers=False)
        if not all(_known_materializer(r.materializer, ctx) for r in carried.values()):
            # Maybe a team's materializer whose module this process has not imported yet:
            # read the inputs from the metadata store instead of trusting the message's.
            task = replace(task, inputs=None)
    claimed = call_with_backoff(lambda: _claim(task, ctx), what=f"{what}: claim", policy=backoff)
    if claimed is None:
        log.info("%s: already taken or run ended; dropping task", what)
        return []
    step, row, produced, blob, lease_s = claimed
    ctx.leases.hold(row.id, row.attempt, lease_s)
    written: list[str] = []
    try:
        artifacts, values, error, tb, retryable = _run(step, row, produced, blob, ctx, written)
        if error is not None:
            _discard(ctx.artifacts, written)
            log.warning("%s attempt %d failed: %s", what, row.attempt, error)
            now = time.time()

            def record_failure() -> list[QueuedStep] | None:
                with ctx.metadata.transaction() as s:
                    return dispatch.step_failed(
                        s,
                        row,
                        attempt=row.attempt,
                        error=error,
                        traceback=tb,
                        values=values,
                        now=now,
                        retry_delay_s=retry_delay_s(row.attempt, ctx.settings.retry_delay_s),
                        retry_allowed=retryable,
                    )

            follow = call_with_backoff(
                record_failure, what=f"{what}: record failure", policy=backoff
            )
            return follow or []
        return _commit(step, row, produced, artifacts, values, ctx, written)
    except InfrastructureError:
        # The database stayed away for the whole budget: record nothing (it cannot be
        # reached), keep what was written (a commit may have landed) and let the message
        # go back to the broker; the redelivery takes the step over.
        raise
    except BaseException as e:
        # Killed mid-step (SystemExit, KeyboardInterrupt) or the store failed: record it so
        # the run does not hang, then let it propagate.
        _discard(ctx.artifacts, written)
        try:
            with ctx.metadata.transaction() as s:
                dispatch.step_failed(
                    s,
                    row,
                    attempt=row.attempt,
                    error=_describe(e),
                    traceback=traceback.format_exc(),
                    values={},
                    now=time.time(),
                    retry_allowed=False,
                )
        finally:
            raise
    finally:
        ctx.leases.release(row.id)


def _claim(
    task: StepTask, ctx: WorkerContext
) -> tuple[StepSpec, Any, dict[tuple[str, str], Any], bytes | None, float] | None:
    """Claim the attempt (one guarded, autocommitted UPDATE, or a takeover of a dead attempt)
    and gather what running it needs: the step spec, the claimed row, the input artifacts
    and, on first sight, the step code."""
    spec_entry = dispatch.SPECS.cached(task.run_id)
    if spec_entry is None:
        with ctx.metadata.read() as s:
            spec_entry = dispatch.SPECS.get(s, task.run_id)
    step = spec_entry[1][task.invocation_id]
    policy = ctx.settings.lease_policy()
    lease_s = policy.lease_for(step.timeout_s)
    pid, now = os.getpid(), time.time()
    with ctx.metadata.autocommit() as s:
        row = q.claim(s, task.step_run_id, host=ctx.host, pid=pid, lease_s=lease_s, now=now)
        if row is None:
            row = _redelivered(s, task, ctx, policy, lease_s, now)
    if row is None:
        return None
    produced = _carried_inputs(task)
    blob = None
    if produced is None or step.code_hash not in ctx.code:
        with ctx.metadata.read() as s:
            if produced is None:
                upstream = {ref.step for i in step.inputs for ref in i.refs}
                produced = q.output_artifacts(s, task.run_id, upstream)
            if step.code_hash not in ctx.code:
                blob = q.get_code_blob(s, step.code_hash).pickled
    return step, row, produced, blob, lease_s


def _redelivered(
    s: Any, task: StepTask, ctx: WorkerContext, policy: LeasePolicy, lease_s: float, now: float
) -> Any:
    """A message for a step that is not queued: take it over if its attempt's process is
    provably dead, fail it if that keeps happening, else drop the duplicate (None)."""
    holder = q.holder(s, task.step_run_id)
    decision = policy.on_redelivery(
        holder,
        host=ctx.host,
        pid=os.getpid(),
        running_here=ctx.leases.holds(task.step_run_id),
        pid_alive=pid_alive,
    )
    if decision is Redelivery.DROP or holder is None:
        return None
    lost = f"attempt {holder.attempt} lost its worker process {holder.worker_pid} on {holder.worker_host}"
    if decision is Redelivery.GIVE_UP:
        log.error("run %s step %s: %s, out of attempts", task.run_id, task.invocation_id, lost)
        with ctx.metadata.transaction() as tx:
            dispatch.fail_lost_attempt(
                tx,
                task.step_run_id,
                run_id=task.run_id,
                invocation_id=task.invocation_id,
                attempt=holder.attempt,
                why=lost,
                now=now,
            )
        return None
    log.warning("run %s step %s: %s; taking it over", task.run_id, task.invocation_id, lost)
    return q.take_over(
        s,
        task.step_run_id,
        holder.attempt,
        host=ctx.host,
        pid=os.getpid(),
        lease_s=lease_s,
        now=now,
        reason=lost,
    )


def _run(
    step: StepSpec,
    row: Any,
    produced: dict[tuple[str, str], Any],
    blob: bytes | None,
    ctx: WorkerContext,
    written: list[str],
) -> tuple[list[dict[str, Any]], dict[str, Any], str | None, str, bool]:
    """Load the inputs, call the step and store its outputs, with its logs captured.

    Returns the artifact rows, the step-run values (logs, duration) and, when the step
    (or saving its outputs) raised, the error, its traceback and whether a retry may help.
    """
    started = time.time()
    artifacts: list[dict[str, Any]] = []
    error, tb, retryable = None, "", True
    backoff = ctx.settings.infra_backoff()
    what = f"run {row.run_id} step {step.invocation_id}"
    with capture_logs() as logs:
        try:
            fn = ctx.function(step.code_hash, blob)
            # After the step's code is loaded: its module registered its materializers.
            check_trusted(produced.values(), ctx, materializers=True)
            # An unreachable S3 is retried with backoff here, under the infrastructure budget;
            # what remains after it names S3 and fails the attempt like any other error.
            kwargs = call_with_backoff(
                lambda: _load_inputs(step, produced, ctx.artifacts, ctx.metadata),
                what=f"{what}: load inputs",
                policy=backoff,
            )
            kwargs.update(step.parameters)
            log.info(
                "run %s step %s attempt %d started on %s",
                row.run_id,
                step.invocation_id,
                row.attempt,
                ctx.host,
            )
            result = fn(**kwargs)
            artifacts = _store_outputs(
                step,
                result,
                row,
                row.attempt,
                ctx.artifacts,
                written,
                now=time.time(),
                backoff=backoff,
            )
        except Exception as e:
            error, tb = _describe(e), traceback.format_exc()
            # A corrupt input, altered code or an untrusted input fails the same way on every
            # attempt: retrying would only spend the step's retries.
            retryable = not isinstance(e, _NOT_RETRIED)
    values = {"logs": logs.text, "step_metadata": {"duration_s": round(time.time() - started, 6)}}
    return artifacts, values, error, tb, retryable


_NOT_RETRIED = (ArtifactIntegrityError, CodeIntegrityError, UntrustedInputError)


def _commit(
    step: StepSpec,
    row: Any,
    produced: dict[tuple[str, str], Any],
    artifacts: list[dict[str, Any]],
    values: dict[str, Any],
    ctx: WorkerContext,
    written: list[str],
) -> list[QueuedStep]:
    """Commit a successful attempt with its lineage; discard its outputs if it lost its lease."""
    edges = [
        dispatch.lineage_edge(row.id, row.run_id, q.OUTPUT, a["name"], 0, a["id"])
        for a in artifacts
    ] + dispatch.input_edges(step, row.id, row.run_id, produced)
    now = time.time()
    tries = 0

    def commit() -> list[QueuedStep] | None:
        nonlocal tries
        tries += 1
        with ctx.metadata.transaction() as s:
            follow = dispatch.step_succeeded(
                s,
                row,
                attempt=row.attempt,
                artifacts=artifacts,
                edges=edges,
                values=values,
                window=ctx.settings.max_queued_per_run,
                now=now,
            )
            if follow is None and tries > 1:
                # The connection broke during an earlier try's COMMIT: it may have landed.
                return dispatch.committed_earlier(s, row, attempt=row.attempt, now=now)
            return follow

    follow = call_with_backoff(
        commit,
        what=f"run {row.run_id} step {step.invocation_id}: commit",
        policy=ctx.settings.infra_backoff(),
    )
    if follow is None:
        log.info(
            "run %s step %s attempt %d lost its lease; discarding its outputs",
            row.run_id,
            step.invocation_id,
            row.attempt,
        )
        _discard(ctx.artifacts, written)
        return []
    return follow


def check_trusted(refs: Iterable[Any], ctx: WorkerContext, *, materializers: bool) -> None:
    """Refuse artifacts outside the stack's artifact store and, with ``materializers``,
    materializers that are neither registered nor in an allowed module.

    Raises:
        UntrustedInputError: naming the artifact and what is wrong with it.
    """
    from urllib.parse import unquote

    from zenml_workers.sdk.materializers.registry import materializer_allowed

    root = ctx.artifacts.root_uri.rstrip("/") + "/"
    for ref in refs:
        uri = ref.uri
        if uri and (not uri.startswith(root) or ".." in unquote(uri).split("/")):
            raise UntrustedInputError(
                f"input artifact {ref.id} is at {uri}, outside this stack's artifact store "
                f"{ctx.artifacts.root_uri}; the message is not run (check ZW_ARTIFACT_URI on "
                "the submitting machine and this worker)"
            )
        if materializers and not materializer_allowed(
            ref.materializer, ctx.settings.materializer_modules
        ):
            raise UntrustedInputError(
                f"input artifact {ref.id} names materializer {ref.materializer}, which is neither "
                "registered nor in an allowed module; register it in the step's module or add "
                "its module to ZW_MATERIALIZER_MODULES on the workers"
            )


def _known_materializer(path: str, ctx: WorkerContext) -> bool:
    """Allowed, or defined in a module this process imported already (importing nothing)."""
    import sys

    from zenml_workers.sdk.materializers.registry import materializer_allowed

    return materializer_allowed(path, ctx.settings.materializer_modules) or (
        path.partition(":")[0] in sys.modules
    )


def _carried_inputs(task: StepTask) -> dict[tuple[str, str], q.ArtifactRef] | None:
    """Input artifacts the queueing transaction put in the message, if it did."""
    if task.inputs is None:
        return None
    return {
        (ref["step"], ref["output"]): q.ArtifactRef(
            ref["id"], ref["content_hash"], ref["uri"], ref["materializer"], ref["data_type"]
        )
        for ref in task.inputs
    }


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _load_inputs(
    step: StepSpec,
    produced: dict[tuple[str, str], Any],
    store: ArtifactStore,
    metadata: MetadataStore | None = None,
) -> dict[str, Any]:
    """Load every input, each checked against the hash recorded when it was written.

    Raises:
        ArtifactIntegrityError: an input's bytes changed since; it is marked corrupt in
            ``metadata`` (so caching skips it) and the step function is never called.
    """
    from zenml_workers.sdk.materializers.registry import load_materializer, resolve_type

    values: dict[str, Any] = {}
    for inp in step.inputs:
        loaded = []
        for ref in inp.refs:
            art = produced[(ref.step, ref.output)]
            materializer = load_materializer(art.materializer)()
            try:
                with store.verified_reader(art.uri, expected_hash=art.content_hash) as fp:
                    loaded.append(materializer.load(fp, resolve_type(art.data_type)))
            except ArtifactIntegrityError as e:
                named = e.with_origin(
                    artifact_id=art.id,
                    artifact_name=ref.output,
                    step=ref.step,
                    consumer=f"input '{inp.name}' of step '{step.invocation_id}'",
                )
                raise _record_corrupt(named, metadata) from e.__cause__
        values[inp.name] = loaded if inp.is_list else loaded[0]
    return values


def _record_corrupt(
    e: ArtifactIntegrityError, metadata: MetadataStore | None
) -> ArtifactIntegrityError:
    """Mark the artifact corrupt so no cache lookup offers it again; name its producer."""
    if metadata is None or e.artifact_id is None:
        return e
    try:
        with metadata.transaction() as s:
            origin = q.mark_artifact_corrupt(s, e.artifact_id, now=time.time())
    except Exception:  # the step fails on the corrupt input either way
        log.warning(
            "%s: could not mark artifact %s corrupt", e.consumer, e.artifact_id, exc_info=True
        )
        return e
    if origin is None:
        return e
    # No log line here: the failed attempt is logged with its run and step, and this message.
    run_id, invocation_id = origin
    return e.with_origin(run_id=run_id, step=invocation_id, recorded=True)


def _split_outputs(step: StepSpec, result: Any) -> list[Any]:
    n = len(step.outputs)
    if n == 0:
        return []
    if n == 1:
        return [result]
    if not isinstance(result, tuple | list) or len(result) != n:
        got = (
            f"a {type(result).__name__} of length {len(result)}"
            if isinstance(result, tuple | list)
            else type(result).__name__
        )
        raise MaterializerError(
            f"step {step.name!r} declares {n} outputs ({', '.join(step.output_names())}) but returned {got}; "
            f"return a tuple of {n} values"
        )
    return list(result)


def _store_outputs(
    step: StepSpec,
    result: Any,
    row: Any,
    attempt: int,
    store: ArtifactStore,
    written: list[str],
    *,
    now: float,
    backoff: Backoff,
) -> list[dict[str, Any]]:
    from zenml_workers.sdk.materializers.registry import (
        load_materializer,
        materializer_for_value,
        materializer_path,
        type_path,
    )

    artifacts = []
    for spec, value in zip(step.outputs, _split_outputs(step, result), strict=True):
        declared = load_materializer(spec.materializer) if spec.materializer else None
        cls = materializer_for_value(value, declared)
        # One folder per run; the attempt in the name keeps a re-run step from touching
        # what an earlier attempt wrote (artifacts are immutable).
        key = f"{row.run_id}/{step.invocation_id}.{attempt}.{spec.name}"

        def save(key: str = key, value: Any = value, cls: Any = cls) -> tuple[Any, Any]:
            with store.writer(key) as w:
                meta = cls().save(value, cast(BinaryIO, w))
            return w, meta

        try:
            w, meta = call_with_backoff(
                save,
                what=f"run {row.run_id} step {step.invocation_id}: save {spec.name}",
                policy=backoff,
            )
        except (MaterializerError, ArtifactStoreError):
            # A store error names the store (S3 or the folder), not the materializer.
            raise
        except Exception as e:
            raise MaterializerError(
                f"output {spec.name!r} of step {step.name!r} ({type(value).__name__}) could not be saved with "
                f"{cls.__name__} ({_describe(e)}); return a serialisable value or register a materializer "
                f"for {type(value).__name__} with zenml_workers.register_materializer"
            ) from e
        stored = w.result
        assert stored is not None
        written.append(stored.uri)
        artifacts.append(
            {
                "id": q.new_id(),
                "name": spec.name,
                "uri": stored.uri,
                "data_type": type_path(type(value)),
                "materializer": materializer_path(cls),
                "content_hash": stored.content_hash,
                "size_bytes": stored.size_bytes,
                "artifact_metadata": meta or {},
                "producer_run_id": row.run_id,
                "producer_step_run_id": row.id,
                "created_at": now,
            }
        )
    return artifacts


def _discard(store: ArtifactStore, uris: list[str]) -> None:
    for uri in uris:
        try:
            store.delete(uri)
        except Exception:  # an orphan object is harmless: no row points at it
            log.warning("could not delete uncommitted artifact %s", uri, exc_info=True)
