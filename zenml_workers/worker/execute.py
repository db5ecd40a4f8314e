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
from typing import Any, BinaryIO, cast

from scheduler import dispatch
from scheduler.dispatch import QueuedStep
from stores.artifacts import ArtifactStore
from stores.metadata import queries as q
from zenml_workers.errors import MaterializerError
from zenml_workers.settings import Settings
from zenml_workers.specs import StepSpec, StepTask
from zenml_workers.worker.context import WorkerContext
from zenml_workers.worker.logcapture import capture_logs

log = logging.getLogger("zenml_workers.worker")


def lease_for(step: StepSpec, settings: Settings) -> float:
    """Seconds a claim is valid before recovery may requeue the step."""
    if step.timeout_s:
        return step.timeout_s + max(30.0, settings.heartbeat_interval_s)
    return settings.lease_s


def execute_step(task: StepTask, ctx: WorkerContext) -> list[QueuedStep]:
    """Run one attempt of a queued step and return the follow-up tasks to send.

    Returns ``[]`` when the step was already taken, cancelled or superseded: a
    duplicate delivery is dropped here, so the broker may redeliver freely.
    """
    claimed = _claim(task, ctx)
    if claimed is None:
        log.info(
            "run %s step %s: already taken or run ended; dropping task",
            task.run_id,
            task.invocation_id,
        )
        return []
    step, row, produced, blob, lease_s = claimed
    ctx.leases.hold(row.id, row.attempt, lease_s)
    written: list[str] = []
    try:
        artifacts, values, error, tb = _run(step, row, produced, blob, ctx, written)
        if error is not None:
            _discard(ctx.artifacts, written)
            log.warning(
                "run %s step %s attempt %d failed: %s",
                task.run_id,
                step.invocation_id,
                row.attempt,
                error,
            )
            with ctx.metadata.transaction() as s:
                follow = dispatch.step_failed(
                    s,
                    row,
                    attempt=row.attempt,
                    error=error,
                    traceback=tb,
                    values=values,
                    now=time.time(),
                )
            return follow or []
        return _commit(step, row, produced, artifacts, values, ctx, written)
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
    """Claim the attempt (one guarded, autocommitted UPDATE) and gather what running it needs:
    the step spec, the claimed row, the input artifacts and, on first sight, the step code."""
    spec_entry = dispatch.SPECS.cached(task.run_id)
    if spec_entry is None:
        with ctx.metadata.read() as s:
            spec_entry = dispatch.SPECS.get(s, task.run_id)
    step = spec_entry[1][task.invocation_id]
    lease_s = lease_for(step, ctx.settings)
    with ctx.metadata.autocommit() as s:
        row = q.claim(
            s, task.step_run_id, host=ctx.host, pid=os.getpid(), lease_s=lease_s, now=time.time()
        )
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


def _run(
    step: StepSpec,
    row: Any,
    produced: dict[tuple[str, str], Any],
    blob: bytes | None,
    ctx: WorkerContext,
    written: list[str],
) -> tuple[list[dict[str, Any]], dict[str, Any], str | None, str]:
    """Load the inputs, call the step and store its outputs, with its logs captured.

    Returns the artifact rows, the step-run values (logs, duration) and, when the step
    (or saving its outputs) raised, the error and its traceback.
    """
    started = time.time()
    artifacts: list[dict[str, Any]] = []
    error, tb = None, ""
    with capture_logs() as logs:
        try:
            fn = ctx.function(step.code_hash, blob)
            kwargs = _load_inputs(step, produced, ctx.artifacts)
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
                step, result, row, row.attempt, ctx.artifacts, written, now=time.time()
            )
        except Exception as e:
            error, tb = _describe(e), traceback.format_exc()
    values = {"logs": logs.text, "step_metadata": {"duration_s": round(time.time() - started, 6)}}
    return artifacts, values, error, tb


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
    with ctx.metadata.transaction() as s:
        follow = dispatch.step_succeeded(
            s,
            row,
            attempt=row.attempt,
            artifacts=artifacts,
            edges=edges,
            values=values,
            window=ctx.settings.max_queued_per_run,
            now=time.time(),
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
    step: StepSpec, produced: dict[tuple[str, str], Any], store: ArtifactStore
) -> dict[str, Any]:
    from zenml_workers.sdk.materializers.registry import load_materializer, resolve_type

    values: dict[str, Any] = {}
    for inp in step.inputs:
        loaded = []
        for ref in inp.refs:
            art = produced[(ref.step, ref.output)]
            materializer = load_materializer(art.materializer)()
            with store.reader(art.uri) as fp:
                loaded.append(materializer.load(fp, resolve_type(art.data_type)))
        values[inp.name] = loaded if inp.is_list else loaded[0]
    return values


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
        try:
            with store.writer(key) as w:
                meta = cls().save(value, cast(BinaryIO, w))
        except MaterializerError:
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
