"""A real PostgreSQL cluster on a loopback port, for metadata-store tests.

The cluster lives in a fresh temporary directory owned by the ``postgres`` user when the
tests run as root (``initdb`` refuses to run as root), with durability turned off for speed.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services.process import (
    SETUP_HINT,
    ServiceProcess,
    free_port,
    service_unavailable,
)

START_TIMEOUT_S = 30.0
SUPERUSER = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server; ``url_template`` has a ``{database}`` placeholder."""

    url_template: str
    host: str
    port: int
    user: str = SUPERUSER

    def url(self, database: str) -> str:
        """Return the SQLAlchemy URL (``postgresql+psycopg://``) of ``database``."""
        return self.url_template.format(database=database)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL.

        Raises:
            psycopg.errors.DuplicateDatabase: when it already exists.
        """
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def _conninfo(self, database: str) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={database} connect_timeout=2"


def find_bindir() -> Path | None:
    """Return the newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, or None."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: int(re.sub(r"\D", "", Path(p).parts[-3]) or 0))
    return Path(newest).parent


def _select_one(conninfo: str) -> bool:
    import psycopg

    with psycopg.connect(conninfo) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start one PostgreSQL cluster for the test session and remove it afterwards.

    Fails in CI and skips elsewhere when PostgreSQL is not installed.
    """
    bindir = find_bindir()
    if bindir is None:
        service_unavailable(f"PostgreSQL (`initdb`) was not found; {SETUP_HINT}.")
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError:
            service_unavailable(f"There is no `{SUPERUSER}` user to run PostgreSQL; {SETUP_HINT}.")
        run_as = SUPERUSER
    # Not under pytest's tmp dir: that one is 0700 root and postgres could not traverse it.
    workdir = Path(tempfile.mkdtemp(prefix="zw-postgres-"))
    try:
        if run_as is not None:
            os.chown(workdir, owner.pw_uid, owner.pw_gid)
        data = workdir / "data"
        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            cwd=workdir,
            user=run_as,
            group=run_as,
            extra_groups=[] if run_as else None,
            capture_output=True,
            text=True,
            check=False,
        )
        if initdb.returncode != 0:
            raise RuntimeError(
                f"initdb failed with exit status {initdb.returncode}; see its output:\n"
                f"{initdb.stdout}\n{initdb.stderr}"
            )
        port = free_port()
        process = ServiceProcess(
            "postgres",
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={workdir}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            log_path=workdir / "server.log",
            cwd=workdir,
            user=run_as,
            # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM would wait for clients to leave.
            stop_signal=signal.SIGINT,
        ).start()
        try:
            server = PostgresServer(
                url_template=f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{{database}}",
                host="127.0.0.1",
                port=port,
            )
            process.wait_until(
                lambda: _select_one(server._conninfo("postgres")), START_TIMEOUT_S, "SELECT 1"
            )
            yield server
        finally:
            process.stop(timeout_s=15.0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """SQLAlchemy URL of a new, empty database created for this test alone."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40].strip("_")
    return postgres_server.create_database(f"t_{slug}_{uuid.uuid4().hex[:8]}")
