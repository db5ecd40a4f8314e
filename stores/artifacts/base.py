"""The artifact store interface: immutable, content-hashed objects addressed by URI.

A store writes objects under relative keys (``runs/<run>/<step>/<attempt>/<output>``)
below its root and hands back full URIs (``file:///...``, ``s3://...``,
``memory://...``). Writes stream through an :class:`ArtifactWriter`, which hashes
the bytes as they pass and commits atomically when its ``with`` block exits
cleanly; an exception inside the block leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

from stores.artifacts.integrity import verified
from stores.errors import ArtifactStoreError

__all__ = [
    "ArtifactStore",
    "ArtifactWriter",
    "StoredObject",
    "artifact_store_from_uri",
    "split_uri",
    "validate_key",
]


@dataclass(frozen=True)
class StoredObject:
    """A committed artifact.

    Attributes:
        uri: Full URI of the object (``file:///abs/key``, ``s3://bucket/prefix/key``,
            ``memory://name/key``).
        size_bytes: Number of bytes written.
        content_hash: ``"sha256:<hex>"`` of the bytes, computed while they streamed in.
    """

    uri: str
    size_bytes: int
    content_hash: str


class ArtifactWriter(io.RawIOBase):
    """A write-only, non-seekable byte stream into one artifact.

    Obtain one from :meth:`ArtifactStore.writer`; the store commits it when the
    ``with`` block exits cleanly and aborts it otherwise. Backends implement
    :meth:`_write_chunk`, :meth:`_commit` and :meth:`_abort`; this class counts
    and hashes the bytes.

    Attributes:
        result: The committed object, set once the store has committed the write.
    """

    def __init__(self) -> None:
        super().__init__()
        self.result: StoredObject | None = None
        self._hash = hashlib.sha256()
        self._size_bytes = 0
        self._finished = False

    # -- io.RawIOBase ------------------------------------------------------------

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        """Return the number of bytes written so far."""
        return self._size_bytes

    def write(self, data: Any) -> int:
        """Append ``data`` (any bytes-like object) and return its length in bytes.

        Raises:
            ValueError: If the writer is closed, committed or aborted.
            ArtifactStoreError: If the backend cannot store the bytes.
        """
        if self.closed or self._finished:
            raise ValueError("write to a closed artifact writer")
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return 0
        self._hash.update(view)
        self._write_chunk(view)
        self._size_bytes += view.nbytes
        return view.nbytes

    def close(self) -> None:
        """Refuse further writes; the store still commits or aborts when the block exits."""
        super().close()

    # -- backend hooks -----------------------------------------------------------

    @abstractmethod
    def _write_chunk(self, data: memoryview) -> None:
        """Store ``data``; it is only valid during this call."""

    @abstractmethod
    def _commit(self) -> str:
        """Make the object visible atomically and return its URI.

        Raises:
            ArtifactStoreError: If the key already exists or the commit fails.
        """

    @abstractmethod
    def _abort(self) -> None:
        """Remove everything this writer left behind; must not raise for missing parts."""

    # -- driven by ArtifactStore.writer ------------------------------------------

    def _finish(self) -> StoredObject:
        self._finished = True
        try:
            uri = self._commit()
        except BaseException:
            self._abort()
            raise
        finally:
            super().close()
        self.result = StoredObject(
            uri=uri, size_bytes=self._size_bytes, content_hash=f"sha256:{self._hash.hexdigest()}"
        )
        return self.result

    def _cancel(self) -> None:
        self._finished = True
        try:
            self._abort()
        finally:
            super().close()


#: Characters a key may not hold: ``#`` and ``?`` would end the path when the object's
#: ``s3://`` or ``memory://`` URI is parsed (so ``v#x`` would read ``v``), and a backslash or
#: a control character is a path separator or invisible somewhere.
_UNSAFE_KEY_CHARS = frozenset("#?\\" + "".join(map(chr, range(32))) + "\x7f")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, without a leading or doubled slash.

    A valid key stays below the store's root and reads back from the URI it is given.

    Raises:
        ArtifactStoreError: If the key is empty, absolute, has ``.``/``..``/empty parts, or
            holds ``#``, ``?``, a backslash or a control character.
    """
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or not _UNSAFE_KEY_CHARS.isdisjoint(key)
    ):
        raise ArtifactStoreError(
            f"Artifact key {key!r} is not a relative path like 'runs/<run>/<step>/<attempt>/<output>'; "
            "pass one without leading slashes, empty parts, '.', '..', '#', '?', backslashes "
            "or control characters."
        )
    return key


def split_uri(uri: str, scheme: str) -> tuple[str, str]:
    """Split ``scheme://netloc/path`` into ``(netloc, path without leading slash)``.

    Raises:
        ArtifactStoreError: If ``uri`` has another scheme.
    """
    parts = urlsplit(uri)
    if parts.scheme != scheme:
        raise ArtifactStoreError(
            f"URI {uri!r} is not a {scheme}:// URI, so this store cannot read it; "
            f"open it with artifact_store_from_uri() for its own scheme."
        )
    return parts.netloc, parts.path.lstrip("/")


class ArtifactStore(ABC):
    """Stores immutable artifacts under a root URI.

    Attributes:
        root_uri: URI of the root every key is placed under.
    """

    root_uri: str

    @contextmanager
    def writer(self, key: str) -> Iterator[ArtifactWriter]:
        """Stream a new artifact to ``key`` (relative to the root).

        The object is committed atomically when the block exits cleanly, after which
        ``writer.result`` holds its :class:`StoredObject`. If the block raises, the
        write is aborted and nothing is left behind.

        Raises:
            ArtifactStoreError: If the key is invalid, already exists, or the write fails.
            ArtifactStoreCredentialsError: If the store rejects the credentials.
        """
        w = self._open_writer(validate_key(key))
        try:
            yield w
        except BaseException:
            w._cancel()
            raise
        w._finish()

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Write ``data`` to ``key`` and return the committed object.

        Raises:
            ArtifactStoreError: If the key already exists or the write fails.
        """
        with self.writer(key) as w:
            w.write(data)
        assert w.result is not None
        return w.result

    @abstractmethod
    def _open_writer(self, key: str) -> ArtifactWriter:
        """Return an uncommitted writer for a validated ``key``."""

    @abstractmethod
    def reader(self, uri: str) -> AbstractContextManager[BinaryIO]:
        """Return a context manager yielding a readable, seekable binary stream of ``uri``.

        The stream reads incrementally (``read(n)``); nothing is loaded whole.

        Raises:
            ArtifactNotFoundError: If no object exists at ``uri``.
            ArtifactStoreError: If ``uri`` has another scheme or the read fails.
        """

    @contextmanager
    def verified_reader(
        self, uri: str, *, expected_hash: str, expected_size_bytes: int | None = None
    ) -> Iterator[BinaryIO]:
        """Like :meth:`reader`, but every byte is checked against what was recorded at write time.

        The stream hashes the bytes as they are read (no extra copy) and may be read
        partially or, where the store's stream is, seeked; when the ``with`` block ends the
        rest of the object is read and hashed, so the whole object is always checked. See
        :mod:`stores.artifacts.integrity`.

        Args:
            uri: The object to read.
            expected_hash: ``"sha256:<hex>"`` recorded when it was written.
            expected_size_bytes: Size recorded when it was written, when known.

        Raises:
            ArtifactIntegrityError: The object's hash or size differs from the recorded one
                (raised in place of an error a consumer raised on the corrupt bytes).
            ArtifactNotFoundError: If no object exists at ``uri``.
            ArtifactStoreError: If ``uri`` has another scheme or the read fails.
        """
        with (
            self.reader(uri) as raw,
            verified(
                raw,
                uri=uri,
                expected_hash=expected_hash,
                expected_size_bytes=expected_size_bytes,
            ) as fp,
        ):
            yield cast(BinaryIO, fp)

    def get_bytes(self, uri: str) -> bytes:
        """Return the whole content of ``uri``.

        Raises:
            ArtifactNotFoundError: If no object exists at ``uri``.
            ArtifactStoreError: If the read fails.
        """
        with self.reader(uri) as f:
            data: bytes = f.read()
        return data

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Return whether an object exists at ``uri``.

        Raises:
            ArtifactStoreError: If ``uri`` has another scheme or the store cannot be asked.
        """

    def lost(self, refs: Sequence[Any]) -> set[str]:
        """Ids of ``refs`` (anything with ``id`` and ``uri``) whose object is gone from this
        store: a cache hit on them is not offered. One lookup per object; objects outside
        this store's root are not judged (kept).

        Raises:
            ArtifactStoreError: If the store cannot be asked.
        """
        root = self.root_uri.rstrip("/") + "/"
        return {r.id for r in refs if r.uri.startswith(root) and not self.exists(r.uri)}

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Delete the object at ``uri``; deleting a missing object is not an error.

        Raises:
            ArtifactStoreError: If ``uri`` has another scheme or the delete fails.
        """

    @abstractmethod
    def check(self) -> None:
        """Probe the store cheaply at start-up.

        Raises:
            ArtifactStoreCredentialsError: If the credentials are rejected.
            ArtifactStoreError: If the store is unreachable, missing or not writable.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"


def artifact_store_from_uri(
    uri: str,
    *,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region: str | None = None,
    ca_bundle: str | None = None,
) -> ArtifactStore:
    """Build the artifact store for a root URI; nothing connects until it is used.

    ``/abs/path``, ``file:///abs/path`` or a relative path (made absolute) give a
    :class:`~stores.artifacts.local.LocalArtifactStore`; ``s3://bucket/prefix`` an
    :class:`~stores.artifacts.s3.S3ArtifactStore` (the keyword arguments apply to it
    only); ``memory://name`` a process-local
    :class:`~stores.artifacts.memory.MemoryArtifactStore` for tests.

    Raises:
        ArtifactStoreError: If the scheme is not supported or the URI is malformed.
    """
    parts = urlsplit(uri)
    # A one-letter scheme is a Windows drive ("C:\\..."), i.e. a path.
    if parts.scheme in ("", "file") or len(parts.scheme) == 1:
        from stores.artifacts.local import LocalArtifactStore

        return LocalArtifactStore(uri)
    if parts.scheme == "s3":
        from stores.artifacts.s3 import S3ArtifactStore

        return S3ArtifactStore(
            parts.netloc,
            parts.path,
            endpoint_url=endpoint_url,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            region=region,
            ca_bundle=ca_bundle,
        )
    if parts.scheme == "memory":
        from stores.artifacts.memory import MemoryArtifactStore

        return MemoryArtifactStore(parts.netloc, parts.path)
    raise ArtifactStoreError(
        f"Artifact store URI {uri!r} has unsupported scheme {parts.scheme!r}; "
        "use a folder path, file:///path, s3://bucket/prefix or memory://name."
    )
