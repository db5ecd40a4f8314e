"""In-process artifact store for unit tests, with the same semantics as the real ones.

Stores opened on the same ``memory://<name>`` share one dictionary for the life of
the process, so an SDK and an inline worker in one test see the same artifacts.
Use a unique name per test (e.g. from ``uuid4``) to keep tests apart.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from stores.artifacts.base import ArtifactStore, ArtifactWriter, split_uri
from stores.errors import ArtifactNotFoundError, ArtifactStoreError

__all__ = ["MemoryArtifactStore"]

_LOCK = threading.Lock()
# name -> {key below the name: bytes}; filled only when a store is created, never at import.
_SPACES: dict[str, dict[str, bytes]] = {}


def _space(name: str) -> dict[str, bytes]:
    with _LOCK:
        return _SPACES.setdefault(name, {})


class _MemoryWriter(ArtifactWriter):
    def __init__(self, store: MemoryArtifactStore, path: str) -> None:
        super().__init__()
        self._store = store
        self._path = path
        self._buffer = bytearray()

    def _write_chunk(self, data: memoryview) -> None:
        self._buffer += data

    def _commit(self) -> str:
        with _LOCK:
            if self._path in self._store.objects:
                raise ArtifactStoreError(
                    f"Artifact {self._store.uri_for(self._path)} already exists and artifacts are "
                    "immutable; write to a new key (e.g. a new attempt)."
                )
            self._store.objects[self._path] = bytes(self._buffer)
        return self._store.uri_for(self._path)

    def _abort(self) -> None:
        self._buffer = bytearray()


class MemoryArtifactStore(ArtifactStore):
    """Artifacts in a process-wide dictionary, keyed by store name.

    Args:
        name: Name of the shared space (the ``netloc`` of ``memory://name/prefix``).
        prefix: Optional folder below the name that keys are placed under.
    """

    def __init__(self, name: str = "default", prefix: str = "") -> None:
        if not name or "/" in name:
            raise ArtifactStoreError(
                f"Memory store name {name!r} is invalid; use memory://<name>[/prefix]."
            )
        self.name = name
        self.prefix = prefix.strip("/")
        self.root_uri = f"memory://{name}" + (f"/{self.prefix}" if self.prefix else "")
        self.objects = _space(name)

    def uri_for(self, path: str) -> str:
        """Return the URI of ``path`` (a path below the store name, prefix included)."""
        return f"memory://{self.name}/{path}"

    def _open_writer(self, key: str) -> ArtifactWriter:
        return _MemoryWriter(self, f"{self.prefix}/{key}" if self.prefix else key)

    def _lookup(self, uri: str) -> tuple[dict[str, bytes], str]:
        name, path = split_uri(uri, "memory")
        return (self.objects if name == self.name else _space(name)), path

    @contextmanager
    def reader(self, uri: str) -> Iterator[BinaryIO]:
        """Open ``uri`` as a seekable in-memory stream.

        Raises:
            ArtifactNotFoundError: If no object exists at ``uri``.
            ArtifactStoreError: If ``uri`` is not a memory:// URI.
        """
        objects, path = self._lookup(uri)
        try:
            data = objects[path]
        except KeyError as e:
            raise ArtifactNotFoundError(
                f"No artifact at {uri}; check the URI or whether it was deleted."
            ) from e
        with io.BytesIO(data) as f:
            yield f

    def exists(self, uri: str) -> bool:
        """Return whether an object exists at ``uri``.

        Raises:
            ArtifactStoreError: If ``uri`` is not a memory:// URI.
        """
        objects, path = self._lookup(uri)
        return path in objects

    def delete(self, uri: str) -> None:
        """Delete the object at ``uri``; a missing object is not an error.

        Raises:
            ArtifactStoreError: If ``uri`` is not a memory:// URI.
        """
        objects, path = self._lookup(uri)
        with _LOCK:
            objects.pop(path, None)

    def check(self) -> None:
        """Do nothing: an in-memory store is always reachable."""

    def clear(self) -> None:
        """Drop every object in this store's space (all prefixes of its name)."""
        with _LOCK:
            self.objects.clear()
