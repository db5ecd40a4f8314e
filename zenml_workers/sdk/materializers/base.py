"""The materializer interface and the stream contract every materializer codes against.

A materializer turns one value into one binary stream and back. The streams are
not files: on save the writer is write-only and not seekable (``write()`` and
``tell()``, which counts the bytes written so far, hashing them on the way); on
load the reader only promises ``read(n)``, which may return fewer than ``n``
bytes, like an S3 body. Helpers here adapt those streams for libraries that want
more (``readline`` for pickle, ``closed``/``flush`` for pyarrow).
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from typing import Any, BinaryIO, ClassVar

__all__ = [
    "COPY_CHUNK_BYTES",
    "Materializer",
    "WriteSink",
    "buffered_reader",
    "copy_stream",
    "read_all",
    "read_exactly",
    "type_name",
]

#: Chunk size, in bytes, for copying between streams and temporary files.
COPY_CHUNK_BYTES = 8 * 1024 * 1024


def type_name(tp: type) -> str:
    """Return the registry key of a class: ``module.Qualname`` (``builtins.dict``)."""
    return f"{tp.__module__}.{tp.__qualname__}"


class Materializer(ABC):
    """Saves values of some types to one binary stream and loads them back.

    Subclasses need a constructor without arguments; the registry makes a fresh
    instance for every value.
    """

    #: Fully qualified names (``type.__module__ + "." + type.__qualname__``) of the
    #: types handled. Strings, so optional libraries are not imported to register them.
    handles: ClassVar[tuple[str, ...]] = ()
    #: True when ``load()`` never executes code taken from the stream.
    safe: ClassVar[bool] = True

    def can_save(self, value: Any) -> bool:
        """Return whether ``save()`` can write ``value`` without losing anything."""
        return True

    @abstractmethod
    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Write ``value`` to the write-only, non-seekable ``fp``.

        Returns:
            Small JSON-able metadata about the value (shape, dtype, rows, columns...).
        """

    @abstractmethod
    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Read a value written by ``save()`` from the non-seekable ``fp``.

        ``data_type`` is the type recorded at save time when it can still be
        imported, else ``None``; materializers use it to restore subclasses.
        """


class _ReadOnlyRaw(io.RawIOBase):
    """Presents a stream that only has ``read(n)`` as a raw, non-seekable reader."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._fp.read(len(view))
        n = len(data)
        view[:n] = data
        return n


def buffered_reader(fp: BinaryIO, buffer_size: int = 1024 * 1024) -> io.BufferedReader:
    """Wrap a ``read(n)``-only stream so it also has ``readline``, ``readinto`` and ``peek``.

    ``buffer_size`` is in bytes. Nothing is read ahead beyond one buffer, so the
    whole stream is never held in memory. Not seekable, like ``fp``.
    """
    return io.BufferedReader(_ReadOnlyRaw(fp), buffer_size=buffer_size)


class WriteSink:
    """A writer adapter for libraries that want a full file object (pyarrow).

    Forwards ``write``/``tell`` to the non-seekable writer, says it is not
    seekable, and ignores ``close()`` so the library cannot close the writer
    that belongs to the artifact store.
    """

    closed = False

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp

    def write(self, data: Any) -> int:
        written = self._fp.write(data)
        return len(memoryview(data).cast("B")) if written is None else written

    def tell(self) -> int:
        return self._fp.tell()

    def flush(self) -> None:
        """Nothing to flush: the artifact store's writer buffers on its own."""

    def close(self) -> None:
        """Leave the underlying writer open; the artifact store closes it."""

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


def read_exactly(fp: BinaryIO, size: int) -> bytes:
    """Read exactly ``size`` bytes, looping over short reads.

    Raises:
        EOFError: The stream ended first (a truncated artifact).
    """
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        data = fp.read(min(remaining, COPY_CHUNK_BYTES))
        if not data:
            raise EOFError(f"The artifact stream ended {remaining} bytes early; it is truncated.")
        chunks.append(data)
        remaining -= len(data)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_all(fp: BinaryIO) -> bytes:
    """Read ``fp`` to its end and return the bytes (held in memory once, plus one chunk)."""
    out = io.BytesIO()
    copy_stream(fp, out)
    return out.getvalue()


def copy_stream(src: BinaryIO, dst: Any, size: int | None = None) -> int:
    """Copy ``src`` to ``dst`` in chunks of :data:`COPY_CHUNK_BYTES`.

    Copies ``size`` bytes when given, else to the end of ``src``.

    Returns:
        The number of bytes copied.

    Raises:
        EOFError: ``size`` was given and ``src`` ended before it.
    """
    total = 0
    while size is None or total < size:
        want = COPY_CHUNK_BYTES if size is None else min(COPY_CHUNK_BYTES, size - total)
        data = src.read(want)
        if not data:
            if size is not None:
                raise EOFError(
                    f"The artifact stream ended {size - total} bytes early; it is truncated."
                )
            break
        dst.write(data)
        total += len(data)
    return total
