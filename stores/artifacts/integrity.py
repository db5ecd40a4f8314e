"""Checking an artifact against the sha256 recorded when it was written, while it is read.

:class:`VerifyingReader` wraps the stream a store's ``reader()`` yields and hashes the
bytes as the consumer (a materializer) reads them, without copying them: ``read``
returns the store's own ``bytes`` and ``readinto`` fills the caller's buffer, and
``hashlib`` reads either in place. The hash always covers the object from its first
byte, in order, so it stays correct whatever the consumer does:

* it reads sequentially (JSON, pickle, parquet, safetensors): each byte is hashed once;
* it stops early (``numpy.lib.format.read_array`` never asks for the end of file, pickle
  stops at its STOP opcode): :meth:`VerifyingReader.verify`, called when the ``with``
  block ends, reads and hashes what is left;
* it seeks (a custom materializer): a seek only moves the position; the next read first
  hashes the bytes skipped over, and bytes read again after a seek back are not hashed
  twice.

A truncated object fails too: its hash (and, when the reader was told the recorded
size, its size) no longer matches. A mismatch raises :class:`ArtifactIntegrityError`
at the read that reaches the end of the object, or when the block ends; and when the
consumer fails first (a corrupt ``.npy`` header makes numpy raise), the block's exit
finishes the hash and raises the integrity error in place of the consumer's, so the
cause is named rather than a confusing parse error.

sha256 runs at about 1 GiB/s per core, which is as fast as a fast S3 link, so hashing
on the reading thread would add its whole time to every large read. Past the first
8 MiB the hashing therefore moves to one helper thread per read (``hashlib`` releases
the GIL), fed the same ``bytes`` objects through a short queue: while the store waits
on the network for the next chunk, the last one is being hashed. Small artifacts, most
step outputs, are hashed inline and start no thread.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from stores.errors import ArtifactIntegrityError, ArtifactStoreError

__all__ = ["VerifyingReader", "verified"]

#: Chunk size, in bytes, for hashing what the consumer skipped or left unread.
_DRAIN_BYTES = 1024 * 1024
#: Bytes hashed on the reading thread before the rest moves to a helper thread. Small
#: artifacts (most step outputs) never start one; large ones overlap hashing and reading.
INLINE_HASH_BYTES = 8 * 1024 * 1024
#: Chunks waiting for the helper thread; a full queue makes the reader wait (bounded memory).
_PENDING_CHUNKS = 4


class _Digest:
    """sha256 of bytes fed in order. Past :data:`INLINE_HASH_BYTES` it hashes on a helper
    thread (``hashlib`` releases the GIL), so hashing one chunk overlaps reading the next.

    Only immutable ``bytes`` go to the thread, so nothing is copied; a caller's buffer
    (``readinto``) is hashed on the spot, after the queued chunks.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._fed = 0
        self._queue: queue.Queue[bytes | memoryview | None] | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def update(self, data: bytes | memoryview, *, stable: bool) -> None:
        """Add ``data``; ``stable`` says it cannot change after this call (a ``bytes``)."""
        self._fed += len(data)
        if self._queue is None and (not stable or self._fed <= INLINE_HASH_BYTES):
            self._hash.update(data)
            return
        if self._queue is None:
            self._start()
        assert self._queue is not None
        if stable:
            self._queue.put(data)
        else:
            self._queue.join()
            self._hash.update(data)

    def hexdigest(self) -> str:
        self.close()
        if self._failure is not None:
            raise self._failure
        return self._hash.hexdigest()

    def close(self) -> None:
        """Let the helper thread finish what is queued and stop."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=_PENDING_CHUNKS)
        self._thread = threading.Thread(
            target=self._work, args=(self._queue,), name="zw-artifact-hash", daemon=True
        )
        self._thread.start()

    def _work(self, chunks: queue.Queue[bytes | memoryview | None]) -> None:
        while True:
            chunk = chunks.get()
            try:
                if chunk is None:
                    return
                if self._failure is None:
                    self._hash.update(chunk)
            except BaseException as e:  # noqa: BLE001 - re-raised by hexdigest(); keep draining
                self._failure = e
            finally:
                chunks.task_done()


class VerifyingReader(io.BufferedIOBase):
    """A readable stream over ``raw`` that checks its bytes against ``expected_hash``.

    Seekable exactly when ``raw`` is. Closing it leaves ``raw`` open (the store owns it).

    Args:
        raw: The store's stream of the object, positioned at its start.
        uri: URI of the object, for the error message.
        expected_hash: ``"sha256:<hex>"`` recorded at write time.
        expected_size_bytes: Size recorded at write time, if known.

    Raises:
        ArtifactStoreError: If ``expected_hash`` is not a ``sha256:<hex>`` string.
    """

    def __init__(
        self,
        raw: BinaryIO,
        *,
        uri: str,
        expected_hash: str,
        expected_size_bytes: int | None = None,
    ) -> None:
        super().__init__()
        algorithm, _, digest = expected_hash.partition(":")
        if algorithm != "sha256" or len(digest) != 64:
            raise ArtifactStoreError(
                f"Cannot verify {uri}: the recorded hash {expected_hash!r} is not 'sha256:<hex>'; "
                "the artifact row was not written by zenml-workers."
            )
        self._raw = raw
        self._uri = uri
        self._expected_hash = expected_hash
        self._expected_size_bytes = expected_size_bytes
        self._hash = _Digest()
        self._pos = 0  # where the consumer is (and ``raw`` is, between calls)
        self._hashed = 0  # bytes [0, _hashed) are in the hash
        self._done = False  # the whole object is hashed and compared
        self._error: ArtifactIntegrityError | None = None

    # -- io.BufferedIOBase -----------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(self._raw.seekable())

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset``; the bytes skipped are hashed when the next read needs them.

        Raises:
            io.UnsupportedOperation: If the store's stream is not seekable.
        """
        self._check_open()
        if not self.seekable():
            raise io.UnsupportedOperation("seek")
        self._pos = self._raw.seek(offset, whence)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all that is left when negative or None).

        Raises:
            ArtifactIntegrityError: The read reached the end and the object does not match.
        """
        self._before_read()
        want = -1 if size is None or size < 0 else size
        data: bytes = self._raw.read(want)
        self._after_read(data, at_end=want < 0 or (want > 0 and not data))
        return data

    def read1(self, size: int = -1) -> bytes:
        read1 = getattr(self._raw, "read1", None)
        if read1 is None:
            return self.read(size)
        self._before_read()
        data: bytes = read1(size)
        self._after_read(data, at_end=size != 0 and not data)
        return data

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` (no intermediate copy) and return the number of bytes read.

        Raises:
            ArtifactIntegrityError: The read reached the end and the object does not match.
        """
        view = memoryview(buffer).cast("B")
        self._before_read()
        n = self._raw_readinto(view)
        self._after_read(view[:n], at_end=view.nbytes > 0 and not n)
        return n

    def readinto1(self, buffer: Any) -> int:
        return self.readinto(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        self._before_read()
        data: bytes = self._raw.readline(-1 if size is None else size)
        self._after_read(data, at_end=size != 0 and not data)
        return data

    def close(self) -> None:
        """Refuse further reads; the store closes its own stream."""
        self._hash.close()
        super().close()

    # -- verification ----------------------------------------------------------------------

    @property
    def verified(self) -> bool:
        """Whether the whole object has been read and matched what was recorded."""
        return self._done and self._error is None

    def verify(self) -> None:
        """Hash whatever has not been read yet and compare; a no-op once done.

        Raises:
            ArtifactIntegrityError: The object does not match its recorded hash or size.
            ArtifactStoreError: The store failed while reading the rest.
        """
        if self._done:
            if self._error is not None:
                raise self._error
            return
        if self._pos != self._hashed:
            self._raw.seek(self._hashed)
        while chunk := self._raw.read(_DRAIN_BYTES):
            self._hash.update(chunk, stable=True)
            self._hashed += len(chunk)
        self._pos = self._hashed
        self._conclude()

    def failure(self) -> ArtifactIntegrityError | None:
        """The integrity error, if the object is corrupt; for a consumer that already failed.

        Finishes the hash first. A store error while reading the rest is not reported: the
        consumer's own error is then the one to show.
        """
        try:
            self.verify()
        except ArtifactIntegrityError as e:
            return e
        except Exception:  # noqa: BLE001 - the consumer's error stays the one raised
            return None
        return None

    # -- internals -------------------------------------------------------------------------

    def _raw_readinto(self, view: memoryview) -> int:
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            return int(readinto(view))
        data = self._raw.read(view.nbytes)  # a stream with only read(n)
        view[: len(data)] = data
        return len(data)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("read from a closed artifact reader")

    def _before_read(self) -> None:
        self._check_open()
        if self._pos > self._hashed and not self._done:
            self._catch_up()

    def _catch_up(self) -> None:
        """Hash the bytes a forward seek skipped, so the hash stays one pass from byte 0."""
        target = self._pos
        self._raw.seek(self._hashed)
        while self._hashed < target:
            chunk = self._raw.read(min(_DRAIN_BYTES, target - self._hashed))
            if not chunk:  # sought past the end: the whole object is hashed now
                self._conclude()
                break
            self._hash.update(chunk, stable=True)
            self._hashed += len(chunk)
        self._raw.seek(target)

    def _after_read(self, data: bytes | memoryview, *, at_end: bool) -> None:
        n = len(data)
        if n and not self._done and self._pos + n > self._hashed:
            fresh = memoryview(data)[self._hashed - self._pos :]
            self._hash.update(fresh, stable=isinstance(data, bytes))
            self._hashed = self._pos + n
        self._pos += n
        if at_end and not self._done and self._pos == self._hashed:
            self._conclude()

    def _conclude(self) -> None:
        self._done = True
        actual = f"sha256:{self._hash.hexdigest()}"
        expected_size = self._expected_size_bytes
        if actual != self._expected_hash or (
            expected_size is not None and expected_size != self._hashed
        ):
            self._error = ArtifactIntegrityError(
                uri=self._uri,
                expected_hash=self._expected_hash,
                actual_hash=actual,
                expected_size_bytes=expected_size,
                actual_size_bytes=self._hashed,
            )
            raise self._error


@contextmanager
def verified(
    raw: BinaryIO, *, uri: str, expected_hash: str, expected_size_bytes: int | None = None
) -> Iterator[VerifyingReader]:
    """Yield a :class:`VerifyingReader` over ``raw`` and verify the whole object on exit.

    A clean exit hashes what the consumer left unread and raises on a mismatch, so a
    value decoded from corrupt bytes never leaves the block. When the block raises, a
    corrupt object's :class:`ArtifactIntegrityError` replaces the error (chained to it);
    otherwise the error propagates unchanged. ``KeyboardInterrupt`` and the like are not
    delayed by reading the rest.

    Raises:
        ArtifactIntegrityError: The object does not match its recorded hash or size.
        ArtifactStoreError: The store failed while reading the rest.
    """
    fp = VerifyingReader(
        raw, uri=uri, expected_hash=expected_hash, expected_size_bytes=expected_size_bytes
    )
    try:
        try:
            yield fp
        except Exception as e:
            corrupt = fp.failure()
            if corrupt is None or corrupt is e:
                raise
            raise corrupt from e
        fp.verify()
    finally:
        fp.close()
