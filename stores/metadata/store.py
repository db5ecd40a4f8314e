"""The SQL metadata store: engine set-up, migrations and transactions.

One :class:`MetadataStore` per process and URL. SQLite runs in WAL mode with
``BEGIN IMMEDIATE`` for writes, so several local processes can write without
upgrade deadlocks; PostgreSQL is used as is (READ COMMITTED, row locks).
Queries on runs, steps and artifacts live in :mod:`stores.metadata.queries`, those on
workers and their leases in :mod:`stores.metadata.workers`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stores import tls
from stores.errors import MetadataStoreError, MetadataStoreUnavailableError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

log = logging.getLogger("zenml_workers.stores.metadata")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: Newest Alembic revision; checked with one query at start-up so Alembic is only imported to migrate.
HEAD_REVISION = "0006_team"


#: The key of ``Session.info`` under which every session of a :class:`MetadataStore` names it.
STORE_INFO_KEY = "zw_metadata_store"

#: Query parameters whose values are secrets, matched as substrings of the lower-cased name
#: (``password``, ``sslpassword``, ``X-Amz-Signature``, ``access_token``, ``secret_key`` ...).
_SECRET_PARAMS = ("pass", "pwd", "secret", "token", "key", "signature", "credential", "auth")


def redact_url(url: str) -> str:
    """``url`` with every secret replaced by ``***``, for logs, messages and run records: the
    password in ``user:pass@`` (and a lone ``:pass@``), and the values of query parameters
    such as ``password``, ``secret``, ``token`` or ``key``. Text that is not a URL is kept."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    # Edit the text in place: rebuilding it would normalise it (sqlite:////abs/path).
    out = url
    if "@" in parts.netloc:
        creds, host = parts.netloc.rsplit("@", 1)
        user, sep, _ = creds.partition(":")
        if sep:
            out = out.replace(parts.netloc, f"{user}:***@{host}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        hidden = [
            (k, "***" if any(s in k.lower() for s in _SECRET_PARAMS) else v) for k, v in pairs
        ]
        if hidden != pairs:
            out = out.replace(f"?{parts.query}", "?" + urlencode(hidden, safe="*/:"), 1)
    return out


#: A pooled PostgreSQL connection idle for longer is pinged before use.
IDLE_PING_S = 10.0


def _ping_when_idle(engine: Any, *, idle_s: float) -> None:
    """Test a pooled connection before use only if it sat idle for ``idle_s`` seconds, or if
    its socket has something to read while no query is running: the server closed it (a
    restart, a fail-over, a killed backend) and its farewell or EOF is waiting there.

    ``pool_pre_ping`` would add a round trip to every transaction (two per step); a
    ``select()`` on the socket costs microseconds and catches a restarted server on the
    first use after it, instead of failing that use.
    """
    import select

    from sqlalchemy import event, exc

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["zw_last_used"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get("zw_last_used")
        if last is None:
            return
        if time.monotonic() - last < idle_s:
            try:
                readable, _, _ = select.select([dbapi_conn.fileno()], [], [], 0)
            except (OSError, ValueError):
                readable = [True]  # no usable socket: let the ping decide
            if not readable:
                return
        try:
            cur = dbapi_conn.cursor()
            cur.execute("SELECT 1")
            cur.close()
            # psycopg opened a transaction for the ping; end it, or the next user cannot
            # switch the connection to autocommit ("can't change 'autocommit' now").
            dbapi_conn.rollback()
        except Exception as e:
            # The pool discards this connection and checks out a fresh one.
            raise exc.DisconnectionError(str(e)) from e


def _is_outage(e: BaseException) -> bool:
    """Whether ``e`` means the database is unreachable (or, for SQLite, unusable) rather than
    a wrong statement: operational and interface errors, dropped connections, pool time-outs."""
    from sqlalchemy import exc

    if isinstance(e, exc.DBAPIError) and e.connection_invalidated:
        return True
    return isinstance(e, exc.OperationalError | exc.InterfaceError | exc.TimeoutError)


class MetadataStore:
    """Connection to the metadata database.

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db`` or ``postgresql+psycopg://...``).
        migrate: bring the schema to the newest revision on first use.
        connect_args: extra driver connection parameters for PostgreSQL, e.g. libpq's TLS
            ones (``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``); they win over
            the same parameters in ``url``'s query. Ignored for SQLite.

    Raises:
        MetadataStoreError: the URL is malformed, its driver is missing or the
            database cannot be reached or migrated.
    """

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        idle_ping_s: float = IDLE_PING_S,
        connect_args: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.connect_args = dict(connect_args or {})
        self.idle_ping_s = idle_ping_s
        self._migrate = migrate
        self._engine: Engine | None = None
        self._write_engine: Engine | None = None
        self._autocommit_engine: Engine | None = None
        self._pid = os.getpid()
        self._ready = False
        path = url.split("///", 1)[-1] if url.startswith("sqlite") else ""
        self._lock_path = (
            f"{path}.lock" if path and path != ":memory:" and os.name == "posix" else None
        )
        self._lock_fd: int | None = None
        self._lock_pid = 0
        self._thread_lock = threading.RLock()
        self._store_id: str | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    # -- engine -----------------------------------------------------------------------------

    def _build_engine(self) -> None:
        from sqlalchemy import create_engine, event
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            if self.is_sqlite:
                path = self.url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(
                    self.url, connect_args={"timeout": 60, "check_same_thread": False}
                )

                @event.listens_for(engine, "connect")
                def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                    # Let SQLAlchemy's "begin" event, not pysqlite, open transactions.
                    dbapi_conn.isolation_level = None
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=NORMAL")
                    cur.execute("PRAGMA foreign_keys=ON")
                    cur.execute("PRAGMA busy_timeout=60000")
                    cur.close()

                @event.listens_for(engine, "begin")
                def _on_begin(conn: Any) -> None:
                    write = conn.get_execution_options().get("zw_write", False)
                    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            else:
                engine = create_engine(
                    self.url, pool_size=5, max_overflow=10, connect_args=self.connect_args
                )
                _ping_when_idle(engine, idle_s=self.idle_ping_s)
        except (ArgumentError, NoSuchModuleError, ModuleNotFoundError) as e:
            raise MetadataStoreError(
                f"cannot use metadata store URL {redact_url(self.url)!r} ({e}); set ZW_METADATA_URL to "
                "'sqlite:///path/metadata.db' or 'postgresql+psycopg://user:pass@host/db' "
                "(PostgreSQL needs: pip install 'zenml-workers[postgres]')"
            ) from e
        self._engine = engine
        self._write_engine = engine.execution_options(zw_write=True)

    @property
    def engine(self) -> Engine:
        if self._pid != os.getpid():
            # A forked child must not reuse the parent's connections.
            if self._engine is not None:
                self._engine.dispose(close=False)
            self._engine = self._write_engine = self._autocommit_engine = None
            self._pid = os.getpid()
        if self._engine is None:
            self._build_engine()
        if not self._ready:
            self._ready = True
            if self._migrate:
                try:
                    self.migrate()
                except BaseException:
                    self._ready = False
                    raise
        assert self._engine is not None
        return self._engine

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        self._engine = self._write_engine = self._autocommit_engine = None
        self._ready = False
        self._store_id = None  # the URL may name a database made anew after this

    # -- migrations -------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError, ProgrammingError

        assert self._engine is not None
        try:
            with self._engine.connect() as conn:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, ProgrammingError) as e:
            if "alembic_version" in str(e):
                return None
            raise self._unreachable(e) from e

    def migrate(self) -> None:
        """Bring the schema to :data:`HEAD_REVISION` (one query when it already is)."""
        if self._engine is None:
            self._build_engine()
        if self.current_revision() == HEAD_REVISION:
            return
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        assert self._write_engine is not None
        started = time.perf_counter()
        with self._write_engine.begin() as conn:
            if not self.is_sqlite:
                # Workers starting together must not race to create the tables.
                from sqlalchemy import text

                conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        log.info(
            "migrated metadata store %s in %.3fs",
            redact_url(self.url),
            time.perf_counter() - started,
        )

    def _unreachable(self, e: Exception) -> MetadataStoreError:
        """The error for a failed database call: SQLite's locked and full databases and
        PostgreSQL's TLS refusals (see :mod:`stores.tls`) get their own sentences; everything
        else means the database cannot be reached right now."""
        first = (str(getattr(e, "orig", None) or e).splitlines() or [""])[0]
        where = redact_url(self.url)
        if self.is_sqlite and "locked" in first:
            return MetadataStoreError(
                f"the SQLite metadata store {where} stayed locked by another process for 60 s "
                f"({first}); stop the process holding it, or use PostgreSQL for many writers"
            )
        if self.is_sqlite and "full" in first:
            return MetadataStoreError(
                f"the disk holding the SQLite metadata store {where} is full ({first}); "
                "free space there or move ZW_HOME / ZW_METADATA_URL to a bigger disk"
            )
        refused = None if self.is_sqlite else tls.refusal(getattr(e, "orig", None) or e)
        if refused is not None:
            # A certificate or TLS mismatch fails every retry: not an outage, so not retried.
            return MetadataStoreError(
                tls.sentence(
                    "the metadata store (PostgreSQL)",
                    refused,
                    where=where,
                    ca_var="ZW_METADATA_CA_FILE",
                    url_var="ZW_METADATA_URL",
                    cert_vars="ZW_METADATA_CERT_FILE and ZW_METADATA_KEY_FILE",
                    enable_tls="set ZW_METADATA_SSLMODE=verify-full and ZW_METADATA_CA_FILE",
                )
            )
        cls = MetadataStoreError if self.is_sqlite else MetadataStoreUnavailableError
        return cls(
            f"cannot reach the metadata store at {where} ({type(e).__name__}: {first}); "
            "check ZW_METADATA_URL and that the database is running"
        )

    # -- identity ---------------------------------------------------------------------------

    def store_id(self, session: Session | None = None) -> str:
        """The id this database was given when it was migrated (``store_info``), read once per
        process; ``""`` for a database without one. With ``session``, read through it (no second
        connection inside a caller's transaction).

        Step messages carry it, so a worker connected to another database refuses them.

        Raises:
            MetadataStoreError: the store cannot be read.
        """
        if self._store_id is None:
            from sqlalchemy import text

            query = text("SELECT value FROM store_info WHERE key = 'store_id'")
            if session is not None:
                found = session.execute(query).scalar()
            else:
                with self.read() as s:
                    found = s.execute(query).scalar()
            self._store_id = str(found or "")
        return self._store_id

    @cached_property
    def redacted_url(self) -> str:
        """This store's URL with its secrets hidden (:func:`redact_url`), for messages and logs."""
        return redact_url(self.url)

    @property
    def _info(self) -> dict[str, Any]:
        # Code that gets only a session (scheduler.dispatch) finds its store here.
        return {STORE_INFO_KEY: self}

    # -- sessions ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction: committed on a clean exit, rolled back on an exception.

        Raises:
            MetadataStoreUnavailableError: PostgreSQL cannot be reached or dropped the connection.
            MetadataStoreError: SQLite stayed locked, its disk is full, or it cannot be opened.
        """
        from sqlalchemy.orm import Session

        self.engine  # noqa: B018 - builds and migrates on first use
        assert self._write_engine is not None
        with self._writer_lock():
            try:
                with (
                    Session(self._write_engine, expire_on_commit=False, info=self._info) as session,
                    session.begin(),
                ):
                    yield session
            except Exception as e:
                if _is_outage(e):
                    raise self._unreachable(e) from e
                raise

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """Queue SQLite writers on a kernel lock instead of SQLite's busy handler.

        SQLite's busy handler sleeps and retries (1, 2, 5, 10 ms...), which adds
        milliseconds to every contended step commit; ``flock`` wakes the next
        writer the moment the lock is free. A no-op for PostgreSQL.
        """
        if not self.is_sqlite or self._lock_path is None:
            yield
            return
        import fcntl

        with self._thread_lock:
            if self._lock_fd is None or self._lock_pid != os.getpid():
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                self._lock_pid = os.getpid()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def autocommit(self) -> Iterator[Session]:
        """A session whose statements commit one by one: for a single guarded ``UPDATE`` it
        saves the ``BEGIN``/``COMMIT`` round trips. On SQLite, a normal write transaction."""
        if self.is_sqlite:
            with self.transaction() as session:
                yield session
            return
        from sqlalchemy.orm import Session

        engine = self.engine
        if self._autocommit_engine is None:
            self._autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        try:
            with Session(
                self._autocommit_engine, expire_on_commit=False, info=self._info
            ) as session:
                yield session
        except Exception as e:
            if _is_outage(e):
                raise self._unreachable(e) from e
            raise

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (no write lock on SQLite)."""
        from sqlalchemy.orm import Session

        engine = self.engine
        try:
            with (
                Session(engine, expire_on_commit=False, info=self._info) as session,
                session.begin(),
            ):
                yield session
        except Exception as e:
            if _is_outage(e):
                raise self._unreachable(e) from e
            raise
