"""What differs between two recorded runs: code, parameters, inputs, git, Python, packages, stack.

Pure logic on :class:`RunRecord` snapshots (built by ``Client.diff`` from the metadata
store), so it is tested without a store.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from scheduler.specs import PipelineSpec

__all__ = ["AREAS", "Change", "RunDiff", "RunRecord", "diff_runs"]

#: The kinds of difference, in the order they are listed.
AREAS = ("steps", "code", "parameters", "inputs", "git", "python", "packages", "stack")


@dataclass(frozen=True)
class RunRecord:
    """What a run recorded, as far as comparing two runs needs.

    ``input_hashes`` is ``{invocation_id: {input: (content_hash, ...)}}``; ``sources`` is
    the source text recorded with each code blob, ``{code_hash: text}``.
    """

    id: str
    spec: PipelineSpec
    config: Mapping[str, Any]
    environment: Mapping[str, Any]
    input_hashes: Mapping[str, Mapping[str, tuple[str, ...]]]
    sources: Mapping[str, str]


@dataclass(frozen=True)
class Change:
    """One difference: in ``area``, about ``subject`` (a step, parameter, package, setting).

    ``before``/``after`` are None where the subject exists in one run only; ``detail`` holds
    the unified source diff of a code change, when both runs recorded source text.
    """

    area: str
    subject: str
    before: Any
    after: Any
    detail: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line saying what changed."""
        if self.area == "steps":
            return f"step '{self.subject}' is only in run {'B' if self.before is None else 'A'}"
        if self.area == "code":
            return f"step '{self.subject}': code changed ({_short(self.before)} -> {_short(self.after)})"
        if self.area == "inputs":
            return f"{self.subject}: content hash {_short(self.before)} -> {_short(self.after)}"
        if self.area == "packages":
            if self.before is None:
                return f"package {self.subject}: added ({self.after})"
            if self.after is None:
                return f"package {self.subject}: removed (was {self.before})"
        label = {"git": "git ", "packages": "package ", "stack": "stack "}.get(self.area, "")
        show = repr if self.area == "parameters" else str
        before = "(none)" if self.before is None else show(self.before)
        after = "(none)" if self.after is None else show(self.after)
        return f"{label}{self.subject}: {before} -> {after}"


@dataclass(frozen=True)
class RunDiff:
    """Everything that differs between run ``run_a`` and run ``run_b``, area by area."""

    run_a: str
    run_b: str
    changes: tuple[Change, ...]

    @property
    def identical(self) -> bool:
        """True when nothing this comparison looks at differs."""
        return not self.changes

    def area(self, name: str) -> tuple[Change, ...]:
        """The changes in one area (see :data:`AREAS`)."""
        return tuple(c for c in self.changes if c.area == name)

    def lines(self) -> list[str]:
        """The differences as text, grouped by area, or one line saying there are none."""
        if self.identical:
            return [
                f"runs {self.run_a} and {self.run_b} do not differ in code, parameters, "
                "inputs, git state, Python, packages or stack"
            ]
        out = [f"A = run {self.run_a}", f"B = run {self.run_b}"]
        for area in AREAS:
            changes = self.area(area)
            if changes:
                out.append(f"{area}:")
                for c in changes:
                    out.append(f"  {c.describe()}")
                    out.extend(f"    {line}" for line in c.detail)
        return out


def diff_runs(a: RunRecord, b: RunRecord) -> RunDiff:
    """Compare two runs (of the same pipeline or not) area by area."""
    changes = [
        *_steps(a, b),
        *_code(a, b),
        *_parameters(a, b),
        *_inputs(a, b),
        *_mapping("git", _git(a), _git(b)),
        *_mapping("python", _python(a), _python(b)),
        *_mapping(
            "packages", a.environment.get("packages") or {}, b.environment.get("packages") or {}
        ),
        *_mapping("stack", a.config.get("stack") or {}, b.config.get("stack") or {}),
    ]
    return RunDiff(run_a=a.id, run_b=b.id, changes=tuple(changes))


def _steps(a: RunRecord, b: RunRecord) -> Iterator[Change]:
    ids_a, ids_b = a.spec.by_id(), b.spec.by_id()
    for inv in ids_a:
        if inv not in ids_b:
            yield Change("steps", inv, ids_a[inv].name, None)
    for inv in ids_b:
        if inv not in ids_a:
            yield Change("steps", inv, None, ids_b[inv].name)


def _common(a: RunRecord, b: RunRecord) -> Iterator[tuple[str, Any, Any]]:
    ids_b = b.spec.by_id()
    for st in a.spec.steps:
        if st.invocation_id in ids_b:
            yield st.invocation_id, st, ids_b[st.invocation_id]


def _code(a: RunRecord, b: RunRecord) -> Iterator[Change]:
    for inv, sa, sb in _common(a, b):
        if sa.source_hash == sb.source_hash:
            continue
        src_a, src_b = a.sources.get(sa.code_hash, ""), b.sources.get(sb.code_hash, "")
        detail: tuple[str, ...] = ()
        if src_a and src_b:
            detail = tuple(
                line.rstrip("\n")
                for line in difflib.unified_diff(
                    src_a.splitlines(keepends=True),
                    src_b.splitlines(keepends=True),
                    fromfile=f"A/{sa.name}",
                    tofile=f"B/{sb.name}",
                    n=1,
                )
            )
        yield Change("code", inv, sa.source_hash, sb.source_hash, detail)


def _parameters(a: RunRecord, b: RunRecord) -> Iterator[Change]:
    for c in _mapping("parameters", a.spec.parameters, b.spec.parameters):
        yield Change(c.area, f"pipeline parameter {c.subject}", c.before, c.after)
    for inv, sa, sb in _common(a, b):
        for c in _mapping("parameters", sa.parameters, sb.parameters):
            yield Change(c.area, f"step '{inv}' parameter {c.subject}", c.before, c.after)


def _inputs(a: RunRecord, b: RunRecord) -> Iterator[Change]:
    for inv, _, _ in _common(a, b):
        ins_a, ins_b = a.input_hashes.get(inv, {}), b.input_hashes.get(inv, {})
        for name in sorted(set(ins_a) | set(ins_b)):
            ha, hb = ins_a.get(name), ins_b.get(name)
            if ha != hb:
                before = None if ha is None else ", ".join(ha)
                after = None if hb is None else ", ".join(hb)
                yield Change("inputs", f"step '{inv}' input '{name}'", before, after)


def _mapping(area: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> Iterator[Change]:
    """A change per key whose value differs (added and removed keys included), keys sorted."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            yield Change(area, str(key), a.get(key), b.get(key))


def _git(r: RunRecord) -> dict[str, Any]:
    git = r.environment.get("git") or {}
    return {k: git.get(k) for k in ("commit", "dirty", "branch") if k in git}


def _python(r: RunRecord) -> dict[str, Any]:
    system = r.environment.get("system") or {}
    return {k: system.get(k) for k in ("python", "implementation") if k in system}


def _short(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text[: text.index(":") + 13] if ":" in text and len(text) > 24 else text
