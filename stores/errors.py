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
