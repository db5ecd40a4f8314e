"""Artifact store on a local (or mounted) folder.

A write goes to a hidden temporary file next to its target and is committed with
``os.link`` (which fails if the target exists, so artifacts stay immutable even
under concurrent writers), then the temporary name is unlinked. On filesystems
without hard links it falls back to an existence check and ``os.replace``.
Nothing is fsynced unless asked: a trivial step's tiny artifact costs one open,
its writes, a link and an unlink.
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from stores.artifacts.base import ArtifactStore, ArtifactWriter
from stores.errors import ArtifactNotFoundError, ArtifactStoreError

__all__ = ["LocalArtifactStore"]

# Errors from os.link that mean "this filesystem has no hard links", not "it failed".
_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


def _path_from_uri(uri: str) -> Path:
    """Return the absolute path named by a ``file://`` URI or an absolute path.

    Raises:
        ArtifactStoreError: If ``uri`` has another scheme or is relative.
    """
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ArtifactStoreError(
                f"URI {uri!r} names host {parts.netloc!r}; use file:///absolute/path for local artifacts."
            )
        return Path(unquote(parts.path))
    if parts.scheme == "" and uri.startswith("/"):
        return Path(uri)
    raise ArtifactStoreError(
        f"URI {uri!r} is not a file:// URI, so the local artifact store cannot read it; "
        "open it with artifact_store_from_uri() for its own scheme."
    )


class _LocalWriter(ArtifactWriter):
    def __init__(self, target: Path, *, fsync: bool) -> None:
        super().__init__()
        self._target = target
        self._fsync = fsync
        self._tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        self._file = self._open_tmp()

    def _open_tmp(self) -> BinaryIO:
        try:
            try:
                return open(self._tmp, "xb")  # noqa: SIM115 - closed in commit/abort
            except FileNotFoundError:
                # Folders are made lazily, on the first write below them.
                self._tmp.parent.mkdir(parents=True, exist_ok=True)
                return open(self._tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as e:
            raise ArtifactStoreError(
                f"Cannot create {self._tmp} ({e.strerror}); fix the folder's permissions "
                "or point ZW_ARTIFACT_URI elsewhere."
            ) from e

    def _write_chunk(self, data: memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise ArtifactStoreError(
                f"Writing {self._target} failed: {e.strerror}; free disk space or fix the folder."
            ) from e

    def _commit(self) -> str:
        try:
            if self._fsync:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            try:
                os.link(self._tmp, self._target)
            except OSError as e:
                if e.errno not in _NO_LINK_ERRNOS:
                    raise
                # No hard links here: the check and the rename race, but only for one key.
                if self._target.exists():
                    raise FileExistsError(errno.EEXIST, "File exists", str(self._target)) from e
                os.replace(self._tmp, self._target)
            else:
                os.unlink(self._tmp)
        except FileExistsError as e:
            raise ArtifactStoreError(
                f"Artifact {self._target} already exists and artifacts are immutable; "
                "write to a new key (e.g. a new attempt)."
            ) from e
        except OSError as e:
            raise ArtifactStoreError(
                f"Committing {self._target} failed: {e.strerror}; check the artifact folder."
            ) from e
        return self._target.as_uri()

    def _abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files below a local folder.

    Args:
        root: Folder (path or ``file://`` URI); made absolute. Created lazily.
        fsync: Flush each artifact to disk before committing it (slower, survives power loss).
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        text = os.fspath(root)
        path = _path_from_uri(text) if text.startswith("file:") else Path(text).expanduser()
        self.root = Path(os.path.abspath(path))
        self.root_uri = self.root.as_uri()
        self.fsync = fsync

    def _open_writer(self, key: str) -> ArtifactWriter:
        return _LocalWriter(self.root / key, fsync=self.fsync)

    def path_for(self, uri: str) -> Path:
        """Return the filesystem path of ``uri`` (a ``file://`` URI or absolute path).

        Raises:
            ArtifactStoreError: If ``uri`` is not local.
        """
        return _path_from_uri(uri)

    @contextmanager
    def reader(self, uri: str) -> Iterator[BinaryIO]:
        """Open ``uri`` for streaming reads (a regular, seekable file).

        Raises:
            ArtifactNotFoundError: If no file exists at ``uri``.
            ArtifactStoreError: If ``uri`` is not local or cannot be opened.
        """
        path = _path_from_uri(uri)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ArtifactNotFoundError(
                f"No artifact at {uri}; check the URI or whether it was deleted."
            ) from e
        except OSError as e:
            raise ArtifactStoreError(
                f"Cannot open {path}: {e.strerror}; fix the file's permissions."
            ) from e
        with f:
            yield f

    def exists(self, uri: str) -> bool:
        """Return whether a file exists at ``uri``.

        Raises:
            ArtifactStoreError: If ``uri`` is not local.
        """
        return _path_from_uri(uri).is_file()

    def delete(self, uri: str) -> None:
        """Delete the file at ``uri``; a missing file is not an error.

        Raises:
            ArtifactStoreError: If ``uri`` is not local or the file cannot be removed.
        """
        path = _path_from_uri(uri)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ArtifactStoreError(
                f"Cannot delete {path}: {e.strerror}; fix the folder's permissions."
            ) from e

    def check(self) -> None:
        """Create the root folder if needed and prove it is writable with a probe file.

        Raises:
            ArtifactStoreError: If the folder cannot be created or written.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".zw-check-"):
                pass
        except OSError as e:
            raise ArtifactStoreError(
                f"Artifact folder {self.root} is not a writable folder ({e.strerror}); "
                "fix its permissions or point ZW_ARTIFACT_URI elsewhere."
            ) from e
