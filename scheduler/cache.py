"""Cache keys: what a step's result depends on, and why a step was not a cache hit.

A key is the hash of the step's *ingredients*: its source hash (decorator
arguments excluded), its parameters as canonical JSON, the content hash of
every input artifact and its output materializers. Nothing about which store
or user produced the inputs enters it, so byte-identical upstream output keeps
downstream steps cached after an upstream re-run.
"""

from __future__ import annotations

import hashlib
from typing import Any

from scheduler.specs import StepSpec, canonical_json

CACHE_KEY_VERSION = 1


def ingredients(step: StepSpec, input_hashes: dict[str, list[str]]) -> dict[str, Any]:
    """The cache ingredients of ``step`` given its inputs' content hashes (``{input: [hash, ...]}``)."""
    return {
        "v": CACHE_KEY_VERSION,
        "step": step.name,
        "source_hash": step.source_hash,
        "parameters": canonical_json(step.parameters),
        "inputs": {name: list(hashes) for name, hashes in sorted(input_hashes.items())},
        "materializers": {o.name: o.materializer for o in step.outputs},
    }


def cache_key(ingr: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(ingr).encode()).hexdigest()


_LABELS = {
    "step": "the step name",
    "source_hash": "the step's code",
    "parameters": "its parameters",
    "materializers": "its output materializers",
    "v": "the cache-key format",
}


def explain(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Sentences naming each ingredient that differs between two step runs (empty: same key)."""
    if previous is None:
        return ["no earlier run of this step was found, so there was nothing to reuse"]
    reasons = []
    for key, label in _LABELS.items():
        if previous.get(key) != current.get(key):
            if key == "parameters":
                reasons.append(f"{label} changed: {previous.get(key)} -> {current.get(key)}")
            else:
                reasons.append(f"{label} changed")
    prev_inputs, cur_inputs = previous.get("inputs", {}), current.get("inputs", {})
    for name in sorted(set(prev_inputs) | set(cur_inputs)):
        if name not in prev_inputs:
            reasons.append(f"input {name!r} is new")
        elif name not in cur_inputs:
            reasons.append(f"input {name!r} was removed")
        elif prev_inputs[name] != cur_inputs[name]:
            reasons.append(f"the content of input {name!r} changed")
    return reasons
