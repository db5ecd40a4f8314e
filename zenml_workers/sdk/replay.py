"""What a retry did step by step, and whether a rerun came out the same (pure logic).

``Client.retry`` and ``Client.rerun`` read the runs; the functions here turn plain
``{invocation_id: ...}`` maps into the frozen reports they return, so every sentence is
unit-tested without a store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zenml_workers.sdk.runner import RunHandle

__all__ = ["RerunReport", "RetryResult", "StepComparison", "compare_outputs", "retry_notes"]

#: Step statuses whose outputs exist, so a retry reuses them.
FINISHED = ("completed", "cached")


@dataclass(frozen=True)
class RetryResult:
    """A retry: the new run, the run it resumes, and per step what happens to it.

    ``code`` is ``"current"`` when the pipeline's current code was used (passed in, or its
    recorded module importable here), ``"recorded"`` otherwise.
    """

    run_id: str
    original_run_id: str
    code: str
    steps: Mapping[str, str]
    handle: RunHandle

    def lines(self) -> list[str]:
        head = f"run {self.run_id} retries run {self.original_run_id} with the {self.code} code"
        return [head, *(f"  {inv}: {note}" for inv, note in self.steps.items())]


def retry_notes(
    *,
    original_run_id: str,
    original: Mapping[str, str],
    new: Mapping[str, tuple[str, str | None]],
    changed: Sequence[str],
    upstream: Mapping[str, Sequence[str]],
) -> dict[str, str]:
    """One sentence per step of a just-planned retry.

    Args:
        original_run_id: the run being retried.
        original: the original run's step statuses.
        new: the retry's ``(status, cached_from_run_id)`` per step, in spec order.
        changed: steps whose code differs from the original's.
        upstream: each step's upstream invocation ids.
    """
    notes: dict[str, str] = {}
    for inv, (status, cached_from) in new.items():
        if status == "cached":
            notes[inv] = f"reused from run {cached_from}"
        elif inv in changed:
            notes[inv] = "code changed: runs again"
        elif inv not in original:
            notes[inv] = "new step: runs"
        elif original[inv] not in FINISHED:
            notes[inv] = f"{original[inv]} in run {original_run_id}: runs again"
        else:
            again = [u for u in upstream.get(inv, ()) if new.get(u, ("", None))[0] != "cached"]
            if again:
                notes[inv] = f"runs again after upstream step '{again[0]}'"
            else:
                notes[inv] = f"runs again: its cache key differs from run {original_run_id}'s"
    return notes


@dataclass(frozen=True)
class StepComparison:
    """How one step of a rerun compares with the original.

    ``verdict`` is ``match`` (every output's content hash equal), ``differs``, ``cached``
    (a cache hit, so not evidence) or ``not run`` (it did not complete in the rerun).
    """

    invocation_id: str
    verdict: str
    detail: str
    outputs: Mapping[str, tuple[str | None, str | None]]


@dataclass(frozen=True)
class RerunReport:
    """A rerun of a recorded run and its step-by-step comparison with the original."""

    original_run_id: str
    run_id: str
    status: str
    no_cache: bool
    stack: str
    steps: tuple[StepComparison, ...]

    @property
    def reproduced(self) -> bool:
        """True when the rerun completed and no executed step's output differs."""
        return self.status == "completed" and not self.differing

    @property
    def differing(self) -> tuple[StepComparison, ...]:
        return tuple(c for c in self.steps if c.verdict in ("differs", "not run"))

    def step(self, invocation_id: str) -> StepComparison:
        for c in self.steps:
            if c.invocation_id == invocation_id:
                return c
        raise KeyError(invocation_id)


def compare_outputs(
    original: Mapping[str, Mapping[str, str]],
    rerun: Mapping[str, tuple[str, Mapping[str, str]]],
) -> tuple[StepComparison, ...]:
    """Compare each step's output content hashes, in the rerun's step order.

    Args:
        original: ``{invocation_id: {output: content_hash}}`` of the original run.
        rerun: ``{invocation_id: (status, {output: content_hash})}`` of the rerun.
    """
    out = []
    for inv, (status, hashes) in rerun.items():
        before = original.get(inv, {})
        pairs = {n: (before.get(n), hashes.get(n)) for n in (*before, *hashes)}
        if status == "cached":
            out.append(StepComparison(inv, "cached", "cached: not re-executed", pairs))
            continue
        if status != "completed":
            out.append(StepComparison(inv, "not run", f"not run: {status} in the rerun", pairs))
            continue
        diffs = [f"output {n} hash {a} != {b}" for n, (a, b) in pairs.items() if a != b]
        if diffs:
            out.append(StepComparison(inv, "differs", "differs: " + "; ".join(diffs), pairs))
        else:
            out.append(StepComparison(inv, "match", "match", pairs))
    return tuple(out)


def output_hashes(steps: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{invocation_id: {output: content_hash}}`` of a ``RunView``'s steps."""
    return {inv: {n: a.content_hash for n, a in st.outputs.items()} for inv, st in steps.items()}
