"""Resume, reproduce and compare runs: retry, rerun and diff.

- ``retry`` resumes a failed or cancelled run as a new run (``origin`` kind ``retry``): each
  step that finished is reused from exactly the original's step run, the rest runs again,
  with the current code when the pipeline is passed in or its module is importable here.
- ``rerun`` executes a recorded run again from its recorded spec and code (``--no-cache``:
  every step executes) and compares each output's content hash with the original's.
- ``diff`` lists what differs between two runs (see :mod:`zenml_workers.sdk.rundiff`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zenml_workers.sdk.client import RunView
    from zenml_workers.sdk.pipeline import Pipeline
    from zenml_workers.sdk.replay import RerunReport, RetryResult
    from zenml_workers.sdk.rundiff import RunDiff, RunRecord
    from zenml_workers.sdk.stack import Stack
    from zenml_workers.settings import Settings

#: ``rerun(stack=CURRENT_STACK)`` runs on the client's own stack, not the recorded one.
CURRENT_STACK = "current"


class ReproduceMixin:
    """``Client`` methods ``retry``, ``rerun`` and ``diff``."""

    _stack: Stack

    if TYPE_CHECKING:

        def get_run(self, run_id: str) -> RunView: ...

        def get_stack(self, name: str) -> Any: ...

    def _run(self, run: str | RunView) -> RunView:
        return run if not isinstance(run, str) else self.get_run(run)

    def retry(self, run: str | RunView, *, pipeline: Pipeline | None = None) -> RetryResult:
        """Resume a failed or cancelled run as a new run linked to it, and return at once.

        Every step that finished in the original is cached from it (the step run that
        computed the outputs); the others run again. With ``pipeline`` (or when the run's
        pipeline module is importable here) the current code is used, so a step whose code
        changed runs again; otherwise the recorded code runs.

        Returns:
            The new run's handle and, per step, ``reused from run X`` or why it runs again.

        Raises:
            ReproduceError: the run completed (nothing to retry) or has not ended.
            NotFoundError: no such run, or its code is missing from the metadata store.
        """
        from stores.metadata import history
        from zenml_workers.sdk.recorded import importable_pipeline, load_recorded
        from zenml_workers.sdk.replay import RetryResult, retry_notes
        from zenml_workers.sdk.runner import entrypoint_of, source_dir, submit_built

        original = self._run(run)
        _check_ended(original, retry=True)
        _, recorded = load_recorded(self._stack, run_id=original.id)
        current = pipeline or importable_pipeline(original.config.get("entrypoint"))
        if current is not None:
            built = current.build(**dict(recorded.spec.parameters))
            code_dir, entrypoint, code = (
                source_dir(current.entrypoint),
                entrypoint_of(current),
                "current",
            )
        else:
            built, code_dir, code = recorded, None, "recorded"
            entrypoint = dict(original.config.get("entrypoint") or {}) or None
        with self._stack.metadata.read() as s:
            sources = history.step_sources(s, original.id)
        reuse = {
            inv: (sid if status == "completed" else cached_from)
            for inv, (sid, status, cached_from) in sources.items()
            if status == "completed" or (status == "cached" and cached_from)
        }
        old = recorded.spec.by_id()
        changed = [
            st.invocation_id
            for st in built.spec.steps
            if st.invocation_id in old and old[st.invocation_id].source_hash != st.source_hash
        ]
        handle = submit_built(
            built,
            settings=self._stack.settings,
            origin={
                "kind": "retry",
                "pipeline": original.pipeline,
                "run_id": original.id,
                "code": code,
            },
            reuse={k: v for k, v in reuse.items() if v},
            code_dir=code_dir,
            entrypoint=entrypoint,
        )
        planned = self.get_run(handle.id)
        notes = retry_notes(
            original_run_id=original.id,
            original={inv: st.status for inv, st in original.steps.items()},
            new={inv: (st.status, st.cached_from_run_id) for inv, st in planned.steps.items()},
            changed=changed,
            upstream={st.invocation_id: st.upstream for st in built.spec.steps},
        )
        return RetryResult(handle.id, original.id, code, notes, handle)

    def rerun(
        self,
        run: str | RunView,
        no_cache: bool = False,
        stack: str | Settings | None = None,
        *,
        timeout_s: float | None = None,
        progress: bool = False,
    ) -> RerunReport:
        """Execute a recorded run again with its recorded code and parameters, wait for it,
        and compare each step's output content hashes with the original's.

        Args:
            run: the run (or its id).
            no_cache: execute every step; without it cached steps are reported as
                ``cached: not re-executed`` (no evidence either way).
            stack: ``None``: the recorded stack when it is a stack record this user can see,
                else the current one; ``"current"``: the current stack; a stack record's name;
                or ``Settings``.
            timeout_s: give up waiting after this many seconds (None: wait for ever).
            progress: show the rerun's progress while waiting.

        Raises:
            ReproduceError: the run has not ended.
            NotFoundError: no such run, or a named stack record is not visible.
            RunTimeoutError: ``timeout_s`` passed first.
        """
        from zenml_workers.sdk.pipeline import BuiltPipeline
        from zenml_workers.sdk.recorded import load_recorded
        from zenml_workers.sdk.replay import RerunReport, compare_outputs, output_hashes
        from zenml_workers.sdk.runner import submit_built

        original = self._run(run)
        _check_ended(original, retry=False)
        settings, on = self._rerun_settings(original, stack)
        _, built = load_recorded(self._stack, run_id=original.id)
        spec = built.spec
        if no_cache:
            steps = tuple(replace(st, enable_cache=False) for st in spec.steps)
            spec = replace(spec, enable_cache=False, steps=steps)
        handle = submit_built(
            BuiltPipeline(spec=spec, code=built.code),
            settings=settings,
            origin={
                "kind": "rerun",
                "pipeline": original.pipeline,
                "run_id": original.id,
                "no_cache": no_cache,
            },
            entrypoint=dict(original.config.get("entrypoint") or {}) or None,
        )
        new = handle.wait(timeout_s, progress=progress, raise_on_failure=False)
        hashes = output_hashes(new.steps)
        compared = compare_outputs(
            output_hashes(original.steps),
            {inv: (st.status, hashes[inv]) for inv, st in new.steps.items()},
        )
        return RerunReport(original.id, new.id, new.status, no_cache, on, compared)

    def _rerun_settings(
        self, original: RunView, stack: str | Settings | None
    ) -> tuple[Settings, str]:
        """The settings a rerun uses, and a phrase naming that stack."""
        from zenml_workers.errors import NotFoundError
        from zenml_workers.settings import Settings, load_settings

        current = self._stack.settings
        if isinstance(stack, Settings):
            return stack, f"stack {stack.stack_name!r}"
        if stack == CURRENT_STACK:
            return current, f"the current stack {current.stack_name!r}"
        name = stack or (original.config.get("stack") or {}).get("stack")
        if not name or name == current.stack_name:
            return current, f"stack {current.stack_name!r} (recorded and current)"
        try:
            record = self.get_stack(str(name))
        except NotFoundError:
            if stack is not None:
                raise
            return current, (
                f"the current stack {current.stack_name!r} (the recorded stack {name!r} is no "
                "stack record here)"
            )
        values = record.settings_values()
        return load_settings(apply_active_stack=False, **values), f"the recorded stack {name!r}"

    def diff(self, a: str | RunView, b: str | RunView) -> RunDiff:
        """What differs between two runs: code per step (with the source diff), pipeline and
        step parameters, input content hashes, git commit and dirty state, Python and package
        versions, and the stack.

        Raises:
            NotFoundError: either run does not exist.
        """
        from zenml_workers.sdk.rundiff import diff_runs

        return diff_runs(self._record(self._run(a)), self._record(self._run(b)))

    def _record(self, run: RunView) -> RunRecord:
        from scheduler.specs import PipelineSpec
        from stores.metadata import history
        from stores.metadata import queries as q
        from zenml_workers.sdk.rundiff import RunRecord

        with self._stack.metadata.read() as s:
            spec = PipelineSpec.decode(q.get_run(s, run.id).spec)
            sources = history.code_sources(s, (st.code_hash for st in spec.steps))
        inputs = {
            inv: {
                name: tuple(a.content_hash for a in (value if isinstance(value, list) else [value]))
                for name, value in st.inputs.items()
            }
            for inv, st in run.steps.items()
        }
        return RunRecord(run.id, spec, run.config, run.environment, inputs, sources)


def _check_ended(run: RunView, *, retry: bool) -> None:
    from zenml_workers.errors import ReproduceError

    if run.status == "running":
        raise ReproduceError(
            f"run {run.id} of pipeline {run.pipeline!r} is still running; wait for it to end "
            f"or cancel it with `zw cancel {run.id}` first"
        )
    if retry and run.status == "completed":
        raise ReproduceError(
            f"run {run.id} of pipeline {run.pipeline!r} completed, so there is nothing to "
            f"retry; use `zw rerun {run.id}` to execute it again"
        )
