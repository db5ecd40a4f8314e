"""A step's inputs: which ones a worker trusts, and loading them, each verified.

A message may carry its step's input artifacts (the queueing transaction knew them), which
saves reading them back; what it names is checked before anything is claimed: artifacts only
from inside the stack's artifact store, materializers only registered ones or those of
allowed modules. Every load checks the sha256 recorded when the artifact was written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from scheduler.specs import StepSpec, StepTask
from stores.artifacts import ArtifactStore
from stores.errors import ArtifactIntegrityError
from stores.metadata import queries as q
from stores.metadata.store import MetadataStore
from zenml_workers.errors import UntrustedInputError
from zenml_workers.worker.context import WorkerContext

log = logging.getLogger("zenml_workers.worker")


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


def known_materializer(path: str, ctx: WorkerContext) -> bool:
    """Allowed, or defined in a module this process imported already (importing nothing)."""
    import sys

    from zenml_workers.sdk.materializers.registry import materializer_allowed

    return materializer_allowed(path, ctx.settings.materializer_modules) or (
        path.partition(":")[0] in sys.modules
    )


def carried_inputs(task: StepTask) -> dict[tuple[str, str], q.ArtifactRef] | None:
    """Input artifacts the queueing transaction put in the message, if it did."""
    if task.inputs is None:
        return None
    return {
        (ref["step"], ref["output"]): q.ArtifactRef(
            ref["id"], ref["content_hash"], ref["uri"], ref["materializer"], ref["data_type"]
        )
        for ref in task.inputs
    }


def load_inputs(
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
