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
from dataclasses import replace
from typing import Any

from scheduler import decisions, dispatch, outcomes
from scheduler.backoff import call_with_backoff, retry_delay_s
from scheduler.dispatch import QueuedStep
from scheduler.lease import LeasePolicy, Redelivery
from scheduler.specs import StepSpec, StepTask
from stores.errors import ArtifactIntegrityError, InfrastructureError
from stores.metadata import attempts
from stores.metadata import queries as q
from stores.metadata import workers as w
from zenml_workers.components.lifecycle import step_scope
from zenml_workers.errors import CodeIntegrityError, StoreMismatchError, UntrustedInputError
from zenml_workers.worker.context import WorkerContext, pid_alive
from zenml_workers.worker.inputs import (
    carried_inputs,
    check_trusted,
    known_materializer,
    load_inputs,
)
from zenml_workers.worker.logcapture import capture_logs, store_writer
from zenml_workers.worker.outputs import discard, store_outputs
from zenml_workers.worker.stop import step_body
from zenml_workers.worker.usage import StepMeter

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
        StoreMismatchError: the message was planned in another metadata store than this
            worker's; nothing was read or claimed.
    """
    backoff = ctx.backoff
    what = f"run {task.run_id} step {task.invocation_id}"
    check_store(task, ctx)
    carried = carried_inputs(task)
    if carried is not None:
        # Refused before the claim: a bad message must not touch its run.
        check_trusted(carried.values(), ctx, materializers=False)
        if not all(known_materializer(r.materializer, ctx) for r in carried.values()):
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
            discard(ctx.artifacts, written)
            log.warning("%s attempt %d failed: %s", what, row.attempt, error)
            now = time.time()

            def record_failure() -> list[QueuedStep] | None:
                with ctx.metadata.transaction() as s:
                    return outcomes.step_failed(
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
        discard(ctx.artifacts, written)
        try:
            with ctx.metadata.transaction() as s:
                outcomes.step_failed(
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


def check_store(task: StepTask, ctx: WorkerContext) -> None:
    """Refuse a message planned in another metadata store, before anything of its run is read:
    that store's run is not in this worker's, so the claim could only fail obscurely.

    Raises:
        StoreMismatchError: the message's ``store_id`` is not this worker's store's.
    """
    if not task.store_id:
        return  # an older client's message: nothing to compare
    mine = call_with_backoff(
        ctx.metadata.store_id, what="read the metadata store's id", policy=ctx.backoff
    )
    if not mine or mine == task.store_id:
        return
    raise StoreMismatchError(
        f"worker {ctx.host} refused run {task.run_id} step {task.invocation_id}: it was planned "
        f"in the metadata store at {task.store_url or '(URL not given)'} (store id "
        f"{task.store_id}), but this worker uses the one at {ctx.metadata.redacted_url} (store "
        f"id {mine}); give the client, the scheduler and the workers the same ZW_METADATA_URL "
        "(e.g. the same stack file or ZW_HOME), or start workers on that store"
    )


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
    policy = ctx.lease_policy
    lease_s = policy.lease_for(step.timeout_s)
    pid, now = os.getpid(), time.time()
    with ctx.metadata.autocommit() as s:
        row = attempts.claim(s, task.step_run_id, host=ctx.host, pid=pid, lease_s=lease_s, now=now)
        if row is None:
            row = _redelivered(s, task, ctx, policy, lease_s, now)
    if row is None:
        return None
    produced = carried_inputs(task)
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
    holder = attempts.holder(s, task.step_run_id)
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
            outcomes.fail_lost_attempt(
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
    row = attempts.take_over(
        s,
        task.step_run_id,
        holder.attempt,
        host=ctx.host,
        pid=os.getpid(),
        lease_s=lease_s,
        now=now,
        reason=lost,
    )
    if row is not None:
        w.count_takeover(s, ctx.host)  # a recovery event; the scheduler's metrics export it
    return row


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
    backoff = ctx.backoff
    what = f"run {row.run_id} step {step.invocation_id}"
    meter = StepMeter.for_step(step)
    recorded: dict[str, Any] = {}  # what the step context and components record on the step
    with capture_logs(
        store_writer(ctx.metadata, row.id, row.attempt), what=what, final_with_commit=True
    ) as logs:
        try:
            fn = ctx.function(step.code_hash, blob)
            # After the step's code is loaded: its module registered its materializers.
            check_trusted(produced.values(), ctx, materializers=True)
            # An unreachable S3 is retried with backoff here, under the infrastructure budget;
            # what remains after it names S3 and fails the attempt like any other error.
            kwargs = call_with_backoff(
                lambda: load_inputs(step, produced, ctx.artifacts, ctx.metadata),
                what=f"{what}: load inputs",
                policy=backoff,
            )
            kwargs.update(step.parameters)
            # Its step context, and the stack components that want it (none for most steps).
            scope = step_scope(step, row, ctx, recorded)
            log.info(
                "run %s step %s attempt %d started on %s",
                row.run_id,
                step.invocation_id,
                row.attempt,
                ctx.host,
            )
            with scope:
                # Stop requests (cancel, timeout, hand-back) raise only inside the step's code.
                with meter.measuring(), step_body():
                    result = fn(**kwargs)
                artifacts = store_outputs(
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
    # The last lines are stored by the transaction that ends the attempt; "logs" keeps only
    # what could not be stored as lines.
    values: dict[str, Any] = {
        "logs": logs.leftover,
        "step_metadata": {"duration_s": round(time.time() - started, 6), **recorded},
    }
    if logs.final is not None:
        values[outcomes.LOG_LINES] = logs.final
    meter.add_to(values, earlier=row.step_metadata)
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
        decisions.lineage_edge(row.id, row.run_id, q.OUTPUT, a["name"], 0, a["id"])
        for a in artifacts
    ] + decisions.input_edges(step, row.id, row.run_id, produced)
    now = time.time()
    tries = 0

    def commit() -> list[QueuedStep] | None:
        nonlocal tries
        tries += 1
        with ctx.metadata.transaction() as s:
            follow = outcomes.step_succeeded(
                s,
                row,
                attempt=row.attempt,
                artifacts=artifacts,
                edges=edges,
                values=values,
                window=ctx.settings.max_queued_per_run,
                now=now,
                verify=ctx.artifacts.lost,
            )
            if follow is None and tries > 1:
                # The connection broke during an earlier try's COMMIT: it may have landed.
                return outcomes.committed_earlier(s, row, attempt=row.attempt, now=now)
            return follow

    follow = call_with_backoff(
        commit,
        what=f"run {row.run_id} step {step.invocation_id}: commit",
        policy=ctx.backoff,
    )
    if follow is None:
        log.info(
            "run %s step %s attempt %d lost its lease; discarding its outputs",
            row.run_id,
            step.invocation_id,
            row.attempt,
        )
        discard(ctx.artifacts, written)
        return []
    return follow


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
