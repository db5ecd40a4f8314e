"""Run one step attempt: claim, load inputs, run, store outputs, commit. No Celery here.

The embedded default's worker processes and the Celery workers both call
:func:`execute_step`; the only difference is how the returned follow-up tasks
are sent. Two write transactions per step sit on the critical path: the claim
and the commit (which also settles and queues the downstream steps).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from scheduler import dispatch
from scheduler.dispatch import QueuedStep
from stores.artifacts import ArtifactStore, artifact_store_from_uri
from stores.metadata import queries as q
from stores.metadata.store import MetadataStore
from zenml_workers.errors import MaterializerError
from zenml_workers.settings import Settings
from zenml_workers.specs import StepSpec, StepTask
from zenml_workers.worker.logcapture import capture_logs

log = logging.getLogger("zenml_workers.worker")


@dataclass
class WorkerContext:
    """What a worker process needs: the stores, its identity and a cache of step code."""

    settings: Settings
    metadata: MetadataStore
    artifacts: ArtifactStore
    host: str = field(default_factory=socket.gethostname)
    name: str = ""
    code: OrderedDict[str, Callable[..., Any]] = field(default_factory=OrderedDict)
    _heartbeat: LeaseKeeper | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, name: str = "") -> WorkerContext:
        metadata = MetadataStore(settings.resolved_metadata_url())
        artifacts = artifact_store_from_uri(
            settings.resolved_artifact_uri(), **settings.s3_options()
        )
        return cls(
            settings=settings,
            metadata=metadata,
            artifacts=artifacts,
            name=name or socket.gethostname(),
        )

    def function(self, code_hash: str, pickled: bytes | None) -> Callable[..., Any]:
        """The step function for ``code_hash``, unpickled from ``pickled`` on first use."""
        fn = self.code.get(code_hash)
        if fn is None:
            import cloudpickle

            if pickled is None:
                raise LookupError(f"step code {code_hash} is neither cached nor given")
            fn = cloudpickle.loads(pickled)
            self.code[code_hash] = fn
            if len(self.code) > 512:
                self.code.popitem(last=False)
        return fn

    @property
    def leases(self) -> LeaseKeeper:
        if self._heartbeat is None or self._heartbeat.pid != os.getpid():
            self._heartbeat = LeaseKeeper(self)
        return self._heartbeat


class LeaseKeeper:
    """Renews the SQL lease of running steps from one background thread per process.

    Renewal is off the critical path: a step shorter than the heartbeat
    interval never causes a lease write.
    """

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.pid = os.getpid()
        self._running: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, step_run_id: str, attempt: int, lease_s: float) -> None:
        with self._lock:
            self._running[step_run_id] = (attempt, lease_s)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="zw-lease", daemon=True)
            self._thread.start()

    def release(self, step_run_id: str) -> None:
        with self._lock:
            self._running.pop(step_run_id, None)

    def _loop(self) -> None:
        interval = self.ctx.settings.heartbeat_interval_s
        while not self._wake.wait(interval):
            with self._lock:
                held = dict(self._running)
            if not held:
                continue
            now = time.time()
            try:
                with self.ctx.metadata.transaction() as s:
                    for step_run_id, (attempt, lease_s) in held.items():
                        q.extend_lease(s, step_run_id, attempt, now + lease_s)
            except Exception:  # a missed renewal is retried next tick; recovery handles real loss
                log.warning("could not renew step leases", exc_info=True)


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
    settings = ctx.settings
    spec_entry = dispatch.SPECS.cached(task.run_id)
    if spec_entry is None:
        with ctx.metadata.read() as s:
            spec_entry = dispatch.SPECS.get(s, task.run_id)
    step = spec_entry[1][task.invocation_id]
    lease_s = lease_for(step, settings)
    # The claim is one guarded UPDATE, committed on its own: no BEGIN/COMMIT round trips.
    with ctx.metadata.autocommit() as s:
        row = q.claim(
            s, task.step_run_id, host=ctx.host, pid=os.getpid(), lease_s=lease_s, now=time.time()
        )
    if row is None:
        log.info(
            "run %s step %s: already taken or run ended; dropping task",
            task.run_id,
            task.invocation_id,
        )
        return []
    produced = _carried_inputs(task)
    blob = None
    if produced is None or step.code_hash not in ctx.code:
        with ctx.metadata.read() as s:
            if produced is None:
                upstream = {ref.step for i in step.inputs for ref in i.refs}
                produced = q.output_artifacts(s, task.run_id, upstream)
            if step.code_hash not in ctx.code:
                blob = q.get_code_blob(s, step.code_hash).pickled
    attempt = row.attempt
    ctx.leases.hold(row.id, attempt, lease_s)
    written: list[str] = []
    started = time.time()
    try:
        with capture_logs() as logs:
            try:
                fn = ctx.function(step.code_hash, blob)
                kwargs = _load_inputs(step, produced, ctx.artifacts)
                kwargs.update(step.parameters)
                log.info(
                    "run %s step %s attempt %d started on %s",
                    task.run_id,
                    step.invocation_id,
                    attempt,
                    ctx.host,
                )
                result = fn(**kwargs)
                artifacts = _store_outputs(
                    step, result, row, attempt, ctx.artifacts, written, now=time.time()
                )
                error = None
            except Exception as e:
                error, tb = _describe(e), traceback.format_exc()
        values = {
            "logs": logs.text,
            "step_metadata": {"duration_s": round(time.time() - started, 6)},
        }
        if error is not None:
            _discard(ctx.artifacts, written)
            log.warning(
                "run %s step %s attempt %d failed: %s",
                task.run_id,
                step.invocation_id,
                attempt,
                error,
            )
            with ctx.metadata.transaction() as s:
                follow = dispatch.step_failed(
                    s,
                    row,
                    attempt=attempt,
                    error=error,
                    traceback=tb,
                    values=values,
                    now=time.time(),
                )
            return follow or []
        edges = [
            {
                "step_run_id": row.id,
                "direction": q.OUTPUT,
                "name": a["name"],
                "position": 0,
                "artifact_id": a["id"],
                "run_id": row.run_id,
            }
            for a in artifacts
        ] + dispatch.input_edges(step, row.id, row.run_id, produced)
        with ctx.metadata.transaction() as s:
            follow = dispatch.step_succeeded(
                s,
                row,
                attempt=attempt,
                artifacts=artifacts,
                edges=edges,
                values=values,
                window=settings.max_queued_per_run,
                now=time.time(),
            )
        if follow is None:
            log.info(
                "run %s step %s attempt %d lost its lease; discarding its outputs",
                task.run_id,
                step.invocation_id,
                attempt,
            )
            _discard(ctx.artifacts, written)
            return []
        return follow
    except BaseException as e:
        # Killed mid-step (SystemExit, KeyboardInterrupt): record it so the run does not hang.
        _discard(ctx.artifacts, written)
        try:
            with ctx.metadata.transaction() as s:
                dispatch.step_failed(
                    s,
                    row,
                    attempt=attempt,
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
