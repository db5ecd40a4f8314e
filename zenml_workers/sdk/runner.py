"""``submit()``, ``pipeline(...)`` and the run handle.

Submitting builds the pipeline, records the run and its steps in one SQL
transaction (cached steps are resolved right there), then hands the ready
steps to the stack's orchestrator. Nothing here polls for work: the waiting
caller is woken by the orchestrator and only reads the run's state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from zenml_workers.errors import (
    ConfigurationError,
    ExecutionError,
    InfrastructureError,
    NoWorkerForQueueError,
    RunCancelledError,
    RunFailedError,
    RunTimeoutError,
    StepFailedError,
    StoreMismatchError,
)
from zenml_workers.sdk.stack import Stack, get_stack

if TYPE_CHECKING:
    from zenml_workers.sdk.client import RunView
    from zenml_workers.sdk.pipeline import BuiltPipeline, Pipeline
    from zenml_workers.settings import Settings


def submit(
    pipeline: Pipeline,
    /,
    *,
    settings: Settings | None = None,
    run_name: str | None = None,
    **params: Any,
) -> RunHandle:
    """Start a run of ``pipeline`` on the active stack and return at once.

    Args:
        pipeline: a ``@pipeline``.
        settings: the stack to run on (default: ``ZW_*`` environment / stack file).
        run_name: a name for the run (default: pipeline name and UTC time).
        **params: the pipeline function's parameters.

    Raises:
        PipelineDefinitionError: the pipeline is mis-wired (raised before anything runs).
        ConfigurationError: a step names a queue the stack does not know, or a cluster stack
            has no signing key (``ZW_SECRET_KEY``).
        MetadataStoreError: the metadata store cannot be reached.
    """
    built = pipeline.build(**params)
    return submit_built(
        built,
        settings=settings,
        run_name=run_name,
        code_dir=source_dir(pipeline.entrypoint),
        entrypoint=entrypoint_of(pipeline),
    )


def submit_built(
    built: BuiltPipeline,
    *,
    settings: Settings | None = None,
    run_name: str | None = None,
    origin: dict[str, Any] | None = None,
    reuse: Mapping[str, str] | None = None,
    code_dir: str | None = None,
    entrypoint: dict[str, str] | None = None,
) -> RunHandle:
    """Start a run of an already built spec and its code blobs on the active stack.

    What ``submit()`` does after building, shared with pipelines rebuilt from a recorded run
    (``zenml_workers.sdk.recorded``), which have a spec and code blobs but no source.

    Args:
        built: the spec and the code blobs of its steps.
        settings: the stack to run on (default: ``ZW_*`` environment / stack file).
        run_name: a name for the run (default: pipeline name and UTC time).
        origin: what the run came from (``{"kind": "retry" | "rerun" | "copy", ...}``).
        reuse: invocation id -> step run id of an earlier run whose outputs that step takes
            when its cache key is the same (a retry), even with caching off.
        code_dir: folder of the pipeline's code, whose git state is recorded.
        entrypoint: ``{"module", "qualname"}`` of the pipeline function, when importable.

    Raises:
        ConfigurationError: a step names a queue the stack does not know, or a cluster stack
            has no signing key (``ZW_SECRET_KEY``).
        MetadataStoreError: the metadata store cannot be reached.
    """
    from scheduler.dispatch import plan_run
    from zenml_workers import environment

    stack = get_stack(settings)
    stack.check()
    if not stack.settings.is_embedded:
        from zenml_workers.worker.signing import require_key

        require_key(stack.settings, "client")  # before anything is written
    spec = built.spec
    if not stack.settings.enable_cache:
        # ZW_ENABLE_CACHE=false switches caching off for every step of every pipeline.
        spec = replace(
            spec,
            enable_cache=False,
            steps=tuple(replace(s, enable_cache=False) for s in spec.steps),
        )
    unknown = sorted({s.queue for s in spec.steps} - set(stack.settings.queues))
    if unknown:
        bad = next(s for s in spec.steps if s.queue in unknown)
        raise ConfigurationError(
            f"step {bad.invocation_id!r} names queue {bad.queue!r}, which this stack does not know "
            f"(known: {', '.join(stack.settings.queues)}); fix the queue name or add it to ZW_QUEUES"
        )
    run_id = str(uuid.uuid4())
    now = time.time()
    name = run_name or f"{spec.name}-{datetime.now(UTC).strftime('%Y_%m_%d-%H_%M_%S_%f')}"
    config = {
        "parameters": spec.parameters,
        "enable_cache": spec.enable_cache,
        "steps": {
            s.invocation_id: {
                "parameters": s.parameters,
                "queue": s.queue,
                "retries": s.retries,
                "enable_cache": s.enable_cache,
                "settings": s.settings,
            }
            for s in spec.steps
        },
        "stack": stack.settings.describe(),
    }
    if entrypoint:
        config["entrypoint"] = entrypoint
    blobs = [
        {"code_hash": b.code_hash, "name": b.name, "source": b.source, "pickled": b.pickled}
        for b in built.code.values()
    ]
    with stack.metadata.transaction() as s:
        queued = plan_run(
            s,
            spec=spec,
            code_blobs=blobs,
            run_id=run_id,
            run_name=name,
            config=config,
            environment=environment.capture(code_dir),
            user=stack.settings.user,
            orchestrator=stack.orchestrator.name,
            window=stack.settings.max_queued_per_run,
            now=now,
            origin=origin,
            reuse=reuse,
            verify=stack.artifacts.lost,
        )
    try:
        stack.orchestrator.send(run_id, queued)
    except Exception as e:
        raise ExecutionError(
            f"run {run_id} is recorded but its first steps could not be sent ({type(e).__name__}: {e}); "
            "check ZW_BROKER_URL and that the broker is up: the scheduler resends them once it is, "
            f"or cancel the run with `zw cancel {run_id}`"
        ) from e
    return RunHandle(run_id, stack)


def source_dir(fn: Any) -> str | None:
    """Folder of the file defining ``fn`` (a pipeline's or step's function, whose git state is
    recorded), None in a REPL."""
    import inspect
    import os

    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        return None
    return os.path.dirname(os.path.abspath(path)) if path else os.getcwd()


def entrypoint_of(pipeline: Pipeline) -> dict[str, str] | None:
    """Module and qualified name of the pipeline function when another process could import
    it (a retry then uses the current code), else None (``__main__``, a nested function)."""
    fn = pipeline.entrypoint
    module, qualname = getattr(fn, "__module__", ""), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return None
    return {"module": module, "qualname": qualname}


def run_pipeline(pipeline: Pipeline, params: dict[str, Any]) -> RunView:
    """Run ``pipeline`` and block until it ends; what calling a ``@pipeline`` does."""
    return submit(pipeline, **params).wait()


class RunHandle:
    """A submitted run: its id, live status, and ``wait()``/``cancel()``."""

    def __init__(self, run_id: str, stack: Stack) -> None:
        self.id = run_id
        self._stack = stack

    def __repr__(self) -> str:
        return f"RunHandle(id={self.id!r})"

    @property
    def status(self) -> str:
        """The run's status (``running``, ``completed``, ``failed``, ``cancelled``)."""
        from stores.metadata import queries as q

        with self._stack.metadata.read() as s:
            return q.get_run(s, self.id).status

    def progress(self) -> tuple[int, int]:
        """(finished steps, total steps)."""
        from stores.metadata import queries as q
        from stores.metadata.states import StepStatus

        with self._stack.metadata.read() as s:
            counts = q.status_counts(s, self.id)
        done = sum(n for st, n in counts.items() if StepStatus(st).is_terminal())
        return done, sum(counts.values())

    def blocked_queues(self) -> dict[str, list[str]]:
        """Queues on which this run's steps wait while no live worker consumes them."""
        from stores.metadata import queries as q
        from stores.metadata import workers as w

        if self._stack.settings.is_embedded:
            return {}
        with self._stack.metadata.read() as s:
            waiting = q.waiting_queues(s, self.id)
            live = w.live_queues(s, now=time.time(), max_age_s=self._stack.settings.worker_ttl_s)
        return {
            queue: [inv for _, inv in steps]
            for queue, steps in waiting.items()
            if queue not in live
        }

    def wait(
        self,
        timeout_s: float | None = None,
        *,
        progress: bool | None = None,
        raise_on_failure: bool = True,
    ) -> RunView:
        """Block until the run ends and return it.

        Args:
            timeout_s: give up after this many seconds (None: wait for ever).
            progress: show live progress (steps completed, running, queued, cached, skipped and
                failed; which worker runs what; why the rest waits) and a final line: a live
                view on a terminal, an updating output in a Jupyter kernel, a plain line per
                change (at most every 2 s) otherwise; False for none (warnings still print).
            raise_on_failure: raise when the run fails or is cancelled.

        Raises:
            StepFailedError: a step failed; names it and carries its remote traceback.
            RunCancelledError: the run was cancelled.
            RunTimeoutError: ``timeout_s`` passed first.
            StoreMismatchError: raised on timeout when a worker refused a step because it uses
                another metadata store than this client (shown as a warning at once).
            NoWorkerForQueueError: raised on timeout when steps wait on a queue no live worker consumes.
        """
        from zenml_workers.sdk.client import Client
        from zenml_workers.sdk.progress import ProgressReporter, read_snapshot

        orch = self._stack.orchestrator
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        show = progress is not False
        reporter = ProgressReporter(
            self.id, enabled=show, read=lambda: read_snapshot(self._stack, self.id)
        )
        next_read = 0.0
        # The first look for unconsumed queues waits 5 s: a worker on another metadata store
        # refuses a step within milliseconds, and its reason is the better message.
        last_blocked_check = time.monotonic()
        warned: set[str] = set()
        hint = False
        outage: InfrastructureError | None = None
        try:
            while True:
                now = time.monotonic()
                if hint or now >= next_read:
                    next_read = now + 0.5
                    try:
                        if self._ended(hint):
                            break
                        reporter.poll()  # one snapshot read, at most a few a second
                        refused = orch.refusal(self.id)
                        if refused is not None and refused not in warned:
                            warned.add(refused)
                            reporter.warn(refused)
                        if now - last_blocked_check > 5.0 and refused is None:
                            last_blocked_check = now
                            for queue, steps in self.blocked_queues().items():
                                if queue not in warned:
                                    warned.add(queue)
                                    reporter.warn(_no_worker_message(queue, steps))
                        outage = None
                    except InfrastructureError as e:
                        # The metadata store restarts or fails over: keep waiting, say so once.
                        if outage is None:
                            reporter.warn(f"{e}; still waiting for run {self.id}")
                        outage = e
                        next_read = now + 1.0
                if deadline is not None and now >= deadline:
                    refused = orch.refusal(self.id)
                    if refused is not None:
                        raise StoreMismatchError(refused)
                    blocked = self.blocked_queues()
                    if blocked:
                        queue, steps = next(iter(blocked.items()))
                        raise NoWorkerForQueueError(_no_worker_message(queue, steps))
                    raise RunTimeoutError(
                        f"run {self.id} did not finish within {timeout_s}s; call wait() again or cancel() it"
                    )
                remaining = 0.5 if deadline is None else max(0.0, min(0.5, deadline - now))
                hint = orch.wait_changed(self.id, remaining)
            orch.forget(self.id)
            run = Client(settings=self._stack.settings).get_run(self.id)
            reporter.finish(run)
        finally:
            reporter.close()
        if raise_on_failure:
            _raise_for(run)
        return run

    def _ended(self, hint: bool) -> bool:
        """Whether the run is over; an idle orchestrator may settle it first."""
        if self.status != "running":
            return True
        orch = self._stack.orchestrator
        if hint and orch.idle(self.id):
            orch.settle_idle(self.id)
            return self.status != "running"
        return False

    def cancel(self) -> None:
        """Cancel the run: queued steps are revoked and running ones stopped."""
        from scheduler.outcomes import cancel_run

        with self._stack.metadata.transaction() as s:
            queued, running = cancel_run(s, self.id, now=time.time())
        self._stack.orchestrator.revoke(queued, running)


def _no_worker_message(queue: str, steps: list[str]) -> str:
    return (
        f"step(s) {', '.join(steps[:5])} wait on queue {queue!r}, but no live worker consumes it; "
        f"start one with `zw worker --queues {queue}`"
    )


def _raise_for(run: RunView) -> None:
    if run.status == "completed":
        return
    if run.status == "cancelled":
        raise RunCancelledError(f"run {run.id} of pipeline {run.pipeline!r} was cancelled")
    failed = [s for s in run.steps.values() if s.status == "failed"]
    if failed:
        step = failed[0]
        raise StepFailedError(
            f"step {step.invocation_id!r} of pipeline {run.pipeline!r} failed in run {run.id}: {step.exception}\n"
            f"remote traceback:\n{step.traceback}",
            run_id=run.id,
            step=step.invocation_id,
            remote_traceback=step.traceback,
        )
    raise RunFailedError(
        f"run {run.id} of pipeline {run.pipeline!r} failed: {run.message}", run_id=run.id
    )
