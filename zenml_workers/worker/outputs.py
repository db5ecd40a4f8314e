"""A step's outputs: split from what it returned, saved to attempt-scoped keys, discarded
when the attempt does not commit.

Each output streams once to ``RUN/INVOCATION.ATTEMPT.OUTPUT`` (hashed on the way); an
unreachable store is retried with backoff, and what remains names the store, never the
materializer.
"""

from __future__ import annotations

import logging
from typing import Any, BinaryIO, cast

from scheduler.backoff import Backoff, call_with_backoff
from scheduler.specs import StepSpec
from stores.artifacts import ArtifactStore
from stores.errors import ArtifactStoreError
from stores.metadata import queries as q
from zenml_workers.errors import MaterializerError

log = logging.getLogger("zenml_workers.worker")


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


def store_outputs(
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
                f"{cls.__name__} ({f'{type(e).__name__}: {e}'}); return a serialisable value or register a materializer "
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


def discard(store: ArtifactStore, uris: list[str]) -> None:
    for uri in uris:
        try:
            store.delete(uri)
        except Exception:  # an orphan object is harmless: no row points at it
            log.warning("could not delete uncommitted artifact %s", uri, exc_info=True)
