"""Shared stacks: stack records in the metadata store, registered, shared, exported and imported.

A record lives in the metadata store a user connects to (``ZW_METADATA_URL``); the stack a
user works on is named in a small file of their home (``$ZW_HOME/active-stack``, written by
``zw stack set``), and :func:`~zenml_workers.settings.load_settings` applies that record's
components below the user's own settings. Nothing here imports SQLAlchemy at import time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zenml_workers.sdk.stack import Stack
    from zenml_workers.sdk.stack_record import StackRecord
    from zenml_workers.settings import Settings

#: The file of a user's home that names their active stack record.
ACTIVE_STACK_FILE = "active-stack"

# Records read by load_settings, per (store URL, name, user): once per process.
_records: dict[tuple[str, str, str], StackRecord] = {}
_records_lock = threading.Lock()


def active_stack_name(home: Path) -> str | None:
    """The record named in ``home``'s active-stack file; None when there is none (no file:
    one failed ``open``, no database access)."""
    try:
        name = (home / ACTIVE_STACK_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return name or None


def active_stack_values(settings: Settings, name: str, *, skip: Collection[str]) -> dict[str, Any]:
    """The settings the active record ``name`` gives ``settings.user`` (read from the store
    ``settings`` names, once per process), less those in ``skip``.

    Raises:
        ConfigurationError: the record is not there or not visible to this user, or a secret
            it refers to is not set here.
        MetadataStoreError: the metadata store cannot be read.
    """
    from zenml_workers.errors import ConfigurationError

    url = settings.resolved_metadata_url()
    key = (url, name, settings.user)
    with _records_lock:
        record = _records.get(key)
    if record is None:
        from stores.metadata.store import MetadataStore, redact_url

        store = MetadataStore(url, connect_args=settings.metadata_connect_args())
        try:
            found = _read_record(store, name, settings.user)
        finally:
            store.dispose()
        if found is None:
            raise ConfigurationError(
                f"the active stack {name!r} (set in {settings.home / ACTIVE_STACK_FILE}) is not "
                f"a stack that user {settings.user!r} can see in the metadata store "
                f"{redact_url(url)}; list them with `zw stack list` and pick one with "
                "`zw stack set NAME` (or `zw stack set default`)"
            )
        record = found
        with _records_lock:
            _records[key] = record
    return record.settings_values(skip=set(skip))


def _read_record(store: Any, name: str, user: str) -> StackRecord | None:
    from stores.metadata import stacks as q
    from zenml_workers.sdk.stack_record import StackRecord

    with store.read() as s:
        row = q.get_stack(s, name, user=user)
        return None if row is None else StackRecord.from_row(row)


def forget_records() -> None:
    """Drop the records read so far (after this process changed one)."""
    with _records_lock:
        _records.clear()


class StacksMixin:
    """``Client`` methods for stack records (``list_stacks``, ``register_stack``, ...).

    Every method acts as ``settings.user``: private stacks of other users read as absent.
    """

    _stack: Stack

    @property
    def _user(self) -> str:
        return self._stack.settings.user

    def list_stacks(self) -> list[StackRecord]:
        """The stacks this user can see (shared ones and their own), by name."""
        from stores.metadata import stacks as q
        from zenml_workers.sdk.stack_record import StackRecord

        with self._stack.metadata.read() as s:
            return [StackRecord.from_row(r) for r in q.list_stacks(s, user=self._user)]

    def get_stack(self, name: str) -> StackRecord:
        """The stack record ``name``.

        Raises:
            NotFoundError: no such stack, or a private one of another user.
        """
        found = _read_record(self._stack.metadata, name, self._user)
        if found is None:
            raise self._not_found(name)
        return found

    def _not_found(self, name: str) -> Exception:
        from zenml_workers.errors import NotFoundError

        return NotFoundError(
            f"no stack {name!r} that user {self._user!r} can see in the metadata store "
            f"{self._stack.metadata.redacted_url}; list them with `zw stack list`"
        )

    def register_stack(
        self, name: str, *, share: bool = False, description: str = "", **options: Any
    ) -> StackRecord:
        """Register a stack owned by this user, from ``zw stack register``'s options as
        keyword arguments (``orchestrator="celery"``, ``broker_url=...``,
        ``broker_password_env="REDIS_PASSWORD"``, ``queues=["cpu", "gpu"]``, ``artifact_uri``,
        ``s3_endpoint_url``, ``s3_region``, ``s3_access_key_id_env``,
        ``s3_secret_access_key_env``, ``secret_key_env``, ``mlflow_tracking_uri`` ...; each
        secret as ``<name>_env`` or ``<name>_file``).

        Raises:
            StackRecordError: a literal secret, a bad component, or the name is taken;
                nothing is written then.
        """
        from zenml_workers.sdk.stack_components import components_from_options

        return self._insert(name, components_from_options(**options), share, description)

    def import_stack(
        self, text_or_path: str | os.PathLike[str], *, name: str | None = None, share: bool = False
    ) -> StackRecord:
        """Register a stack from exported TOML (text, or the path of a file), or from a
        settings stack file; ``name`` overrides the name it gives.

        Raises:
            StackRecordError: the file is missing or invalid, holds a literal secret, gives
                no name, or the name is taken; nothing is written then.
        """
        from zenml_workers.errors import StackRecordError
        from zenml_workers.sdk.stack_toml import parse_toml

        text, source = str(text_or_path), "the stack text"
        if isinstance(text_or_path, os.PathLike) or "\n" not in text and "=" not in text:
            source = f"stack file {text_or_path}"
            try:
                text = Path(text_or_path).expanduser().read_text()
            except OSError as e:
                raise StackRecordError(
                    f"cannot read {source} ({e.strerror or e}); give the path of a file "
                    "written by `zw stack export`; nothing was written"
                ) from e
        doc = parse_toml(text, source=source)
        chosen = name or doc.name
        if not chosen:
            raise StackRecordError(
                f"{source} names no stack; give a name (--name NAME); nothing was written"
            )
        return self._insert(chosen, doc.components, share, doc.description)

    def _insert(
        self, name: str, components: dict[str, Any], share: bool, description: str
    ) -> StackRecord:
        import time

        from sqlalchemy.exc import IntegrityError

        from stores.metadata import stacks as q
        from zenml_workers.errors import StackRecordError
        from zenml_workers.sdk.stack_record import StackRecord, check_name

        check_name(name)
        taken = StackRecordError(
            f"a stack named {name!r} already exists in the metadata store; pick another "
            "name (or delete yours first with `zw stack delete`); nothing was written"
        )
        try:
            with self._stack.metadata.transaction() as s:
                if q.name_taken(s, name):
                    raise taken
                row = q.insert_stack(
                    s,
                    name=name,
                    owner=self._user,
                    shared=share,
                    components=components,
                    description=description,
                    now=time.time(),
                )
                record = StackRecord.from_row(row)
        except IntegrityError as e:  # registered at the same moment by someone else
            raise taken from e
        forget_records()
        return record

    def _owned(self, name: str, verb: str) -> Any:
        from stores.metadata import stacks as q
        from zenml_workers.errors import StackRecordError

        with self._stack.metadata.read() as s:
            row = q.get_stack(s, name, user=self._user)
        if row is None:
            raise self._not_found(name)
        if row.owner != self._user:
            raise StackRecordError(
                f"stack {name!r} belongs to {row.owner}, so only {row.owner} can {verb} it "
                f"(you are {self._user!r}: ZW_USER or the login name); nothing was changed"
            )
        return row

    def share_stack(self, name: str) -> StackRecord:
        """Make this user's stack visible to every user of the store.

        Raises:
            NotFoundError: no such stack visible to this user.
            StackRecordError: the stack belongs to someone else.
        """
        import time

        from stores.metadata import stacks as q

        row = self._owned(name, "share")
        with self._stack.metadata.transaction() as s:
            q.set_shared(s, row.id, now=time.time())
        forget_records()
        return self.get_stack(name)

    def delete_stack(self, name: str) -> None:
        """Delete this user's stack (users who had it active get a clear error next time).

        Raises:
            NotFoundError: no such stack visible to this user.
            StackRecordError: the stack belongs to someone else.
        """
        from stores.metadata import stacks as q

        row = self._owned(name, "delete")
        with self._stack.metadata.transaction() as s:
            q.delete_stack(s, row.id)
        forget_records()
        if self.active_stack() == name:
            self.set_active_stack("default")

    def export_stack(self, name: str) -> str:
        """The stack as TOML for ``import_stack``: components and references, no secret value.

        Raises:
            NotFoundError: no such stack visible to this user.
        """
        from zenml_workers.sdk.stack_toml import to_toml

        return to_toml(self.get_stack(name))

    def active_stack(self) -> str:
        """The name of this home's active stack record (``"default"``: none)."""
        return active_stack_name(self._stack.settings.home) or "default"

    def set_active_stack(self, name: str) -> None:
        """Make ``name`` the active stack of this user's home (``ZW_HOME``); ``"default"``
        goes back to the settings alone. Applies to settings loaded afterwards (a new
        ``Client()``, ``submit()``, ``zw`` command) in this process and others.

        Raises:
            NotFoundError: no such stack visible to this user.
        """
        from zenml_workers.sdk.stack_record import DEFAULT_STACK

        path = self._stack.settings.home / ACTIVE_STACK_FILE
        if name == DEFAULT_STACK:
            path.unlink(missing_ok=True)
            return
        self.get_stack(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{ACTIVE_STACK_FILE}.{os.getpid()}")
        tmp.write_text(name + "\n")
        tmp.replace(path)
