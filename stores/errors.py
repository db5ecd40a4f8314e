"""Errors raised by the stores.

The stores are the lowest layer and import nothing else of ours, so the root of
every zenml-workers exception lives here; :mod:`zenml_workers.errors` re-exports
it and adds the SDK, scheduler and worker areas beneath it.
"""

from __future__ import annotations


class ZenMLWorkersError(Exception):
    """Root of every error zenml-workers raises on purpose."""


class StoreError(ZenMLWorkersError):
    """Raised when a store cannot do what was asked of it."""


class ArtifactStoreError(StoreError):
    """Raised when an artifact cannot be written, read or found, or the store is misconfigured."""


class ArtifactNotFoundError(ArtifactStoreError):
    """Raised when an artifact URI names no object in its store."""


class ArtifactStoreCredentialsError(ArtifactStoreError):
    """Raised when the artifact store rejects the configured credentials."""


class ArtifactIntegrityError(ArtifactStoreError):
    """Raised when an artifact's bytes no longer match the sha256 (or size) recorded when it
    was written: a flipped bit, a truncated or a replaced object.

    Reading it again gives the same bytes, so this is not an :class:`InfrastructureError`
    and is never retried. The message names the artifact, where it came from when known,
    both hashes and how to get a good copy.

    Attributes:
        uri: Where the object is.
        expected_hash: ``sha256:<hex>`` recorded at write time.
        actual_hash: ``sha256:<hex>`` of the bytes found.
        expected_size_bytes: Size recorded at write time, or None when the reader was not told.
        actual_size_bytes: Size of the bytes found.
        artifact_id: Id of the artifact row, when known.
        artifact_name: Output name of the artifact, when known.
        run_id: Run whose step produced the artifact, when known.
        step: Invocation id of the step that produced it, when known.
        consumer: What was loading it (``input 'x' of step 'train'``), when known.
        recorded: Whether the metadata store now marks the artifact corrupt (so caching skips it).
    """

    def __init__(
        self,
        *,
        uri: str,
        expected_hash: str,
        actual_hash: str,
        expected_size_bytes: int | None,
        actual_size_bytes: int,
        artifact_id: str | None = None,
        artifact_name: str | None = None,
        run_id: str | None = None,
        step: str | None = None,
        consumer: str | None = None,
        recorded: bool = False,
    ) -> None:
        self.uri = uri
        self.expected_hash = expected_hash
        self.actual_hash = actual_hash
        self.expected_size_bytes = expected_size_bytes
        self.actual_size_bytes = actual_size_bytes
        self.artifact_id = artifact_id
        self.artifact_name = artifact_name
        self.run_id = run_id
        self.step = step
        self.consumer = consumer
        self.recorded = recorded
        super().__init__(self._message())

    def _fields(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments: the default reduce (``cls(*args)``) could not rebuild it.
        return (_rebuild_integrity_error, (self._fields(),))

    def with_origin(
        self,
        *,
        artifact_id: str | None = None,
        artifact_name: str | None = None,
        run_id: str | None = None,
        step: str | None = None,
        consumer: str | None = None,
        recorded: bool | None = None,
    ) -> ArtifactIntegrityError:
        """A copy that also names where the artifact came from; None keeps what is known."""
        fields = self._fields()
        given = {
            "artifact_id": artifact_id,
            "artifact_name": artifact_name,
            "run_id": run_id,
            "step": step,
            "consumer": consumer,
            "recorded": recorded,
        }
        fields.update({k: v for k, v in given.items() if v is not None})
        return ArtifactIntegrityError(**fields)  # type: ignore[arg-type]

    def _message(self) -> str:
        what = f"artifact '{self.artifact_name}'" if self.artifact_name else "artifact"
        where = f"id {self.artifact_id}, {self.uri}" if self.artifact_id else self.uri
        origin = ""
        if self.step and self.run_id:
            origin = f" produced by step '{self.step}' of run {self.run_id}"
        elif self.run_id:
            origin = f" produced in run {self.run_id}"
        expected, actual = self.expected_size_bytes, self.actual_size_bytes
        if expected is not None and expected != actual:
            size = f"it has {actual} bytes where {expected} were written (truncated or replaced)"
        else:
            size = f"its content changed ({actual} bytes{', as written' if expected is not None else ''})"
        step = f"step '{self.step}'" if self.step else "the step that produced it"
        if self.recorded:
            fix = (
                f"it is now marked corrupt and never taken as a cache hit, so re-running the "
                f"pipeline runs {step} again and writes a good copy"
            )
        else:
            fix = (
                f"re-run {step} with caching off (ZW_ENABLE_CACHE=false, or "
                ".with_options(enable_cache=False)) to write a good copy"
            )
        prefix = f"{self.consumer} cannot be loaded: " if self.consumer else ""
        text = (
            f"{prefix}{what} ({where}){origin} is corrupt: {size}, and its content hashes to "
            f"{self.actual_hash} but {self.expected_hash} was recorded when it was written; "
            f"{fix}"
        )
        return text[:1].upper() + text[1:]


def _rebuild_integrity_error(fields: dict[str, object]) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(**fields)  # type: ignore[arg-type]


class MetadataStoreError(StoreError):
    """Raised when the metadata store cannot be reached, migrated or written."""


class NotFoundError(MetadataStoreError):
    """Raised when a pipeline, run, step run or artifact does not exist."""


class InfrastructureError(ZenMLWorkersError):
    """Raised when a service a run depends on (the metadata store, the artifact store, the
    broker) cannot be reached right now; the same call may succeed once it is back.

    Workers retry these with backoff under their own budget (``ZW_INFRA_RETRY_BUDGET_S``),
    separate from a step's ``retries``, and never mark a step failed for one.
    """


class ArtifactStoreUnavailableError(ArtifactStoreError, InfrastructureError):
    """Raised when the artifact store (S3) cannot be reached or answers with a server error."""


class MetadataStoreUnavailableError(MetadataStoreError, InfrastructureError):
    """Raised when the metadata database cannot be reached or dropped the connection."""
