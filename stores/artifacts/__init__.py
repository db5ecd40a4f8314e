"""Artifact stores: immutable, content-hashed objects on a local folder, S3 or in memory.

Importing this package does not import boto3; the S3 store imports it when it first
talks to S3.
"""

from __future__ import annotations

from stores.artifacts.base import (
    ArtifactStore,
    ArtifactWriter,
    StoredObject,
    artifact_store_from_uri,
)
from stores.artifacts.integrity import VerifyingReader, verified
from stores.artifacts.local import LocalArtifactStore
from stores.artifacts.memory import MemoryArtifactStore
from stores.artifacts.s3 import S3ArtifactStore
from stores.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ArtifactStoreCredentialsError,
    ArtifactStoreError,
)

__all__ = [
    "ArtifactIntegrityError",
    "ArtifactNotFoundError",
    "ArtifactStore",
    "ArtifactStoreCredentialsError",
    "ArtifactStoreError",
    "ArtifactWriter",
    "LocalArtifactStore",
    "MemoryArtifactStore",
    "S3ArtifactStore",
    "StoredObject",
    "VerifyingReader",
    "artifact_store_from_uri",
    "verified",
]
