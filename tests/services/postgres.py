"""A real PostgreSQL cluster on a loopback port, for metadata-store tests and benches.

The cluster lives in a fresh temporary directory owned by the ``postgres`` user when
running as root (``initdb`` refuses to run as root), with durability turned off for speed.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.services.process import (
    SETUP_HINT,
    ControlledService,
    ServiceError,
    ServiceProcess,
    ServiceUnavailableError,
    fixture,
    free_port,
    serve,
)
from tests.services.tls import TLSFiles

if TYPE_CHECKING:
    import pytest

START_TIMEOUT_S = 30.0
SUPERUSER = "postgres"


@dataclass(frozen=True)
class PostgresServer(ControlledService):
    """A running PostgreSQL server; ``url_template`` has a ``{database}`` placeholder.

    It listens on ``host`` (127.0.0.1) and on each of ``bind_hosts`` (see :meth:`url_for`).
    When this object started the process it can also crash it (:meth:`kill`), bring it
    back on the same port and cluster folder (:meth:`start`, :meth:`restart`), which keeps
    every committed row, and freeze it (:meth:`pause`). :meth:`stop` is final: it deletes
    the cluster.

    With ``tls`` it refuses connections without TLS (see :func:`start_postgres`); its URLs
    carry no TLS parameters, and a client passes :attr:`ssl_connect_args` to libpq.
    """

    url_template: str
    host: str
    port: int
    user: str = SUPERUSER
    process: ServiceProcess | None = field(default=None, repr=False, compare=False)
    workdir: Path | None = field(default=None, repr=False, compare=False)
    bind_hosts: tuple[str, ...] = ()
    tls: TLSFiles | None = field(default=None, repr=False, compare=False)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every address it listens on: ``host`` first, then ``bind_hosts``."""
        return (self.host, *self.bind_hosts)

    @property
    def ssl_connect_args(self) -> dict[str, str]:
        """libpq parameters verifying the server against the test CA, with its client
        certificate ({} without TLS)."""
        if self.tls is None:
            return {}
        return {
            "sslmode": "verify-full",
            "sslrootcert": str(self.tls.ca_file),
            "sslcert": str(self.tls.client_cert_file),
            "sslkey": str(self.tls.client_key_file),
        }

    def url(self, database: str) -> str:
        """Return the SQLAlchemy URL (``postgresql+psycopg://``) of ``database``."""
        return self.url_template.format(database=database)

    def url_for(self, host: str, database: str) -> str:
        """Return the SQLAlchemy URL of ``database`` through listen address ``host``.

        Raises:
            ValueError: when the server does not listen on ``host``.
        """
        if host not in self.hosts:
            raise ValueError(f"PostgreSQL listens on {', '.join(self.hosts)}, not on {host}.")
        return f"postgresql+psycopg://{self.user}@{host}:{self.port}/{database}"

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once, like a crashed machine.

        The cluster folder stays; :meth:`start` runs crash recovery and keeps every
        committed transaction (commits are written to the OS before they return).

        Raises:
            RuntimeError: when this object did not start the server.
        """
        self._require_process().kill()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server again on the same port and cluster; returns once it answers.

        Raises:
            RuntimeError: when it is still running or this object did not start it.
            ServiceError: when :meth:`stop` already deleted the cluster.
            TimeoutError: when it does not answer ``SELECT 1`` within ``timeout_s`` seconds.
        """
        process = self._require_process()
        if self.workdir is not None and not (self.workdir / "data").is_dir():
            raise ServiceError(f"The cluster in {self.workdir} was deleted by stop().")
        process.start()
        try:
            process.wait_until(
                lambda: _select_one(self._conninfo("postgres")), timeout_s, "SELECT 1"
            )
        except BaseException:
            process.stop(timeout_s=15.0)
            raise

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Shut down (fast: clients are disconnected) keeping the cluster, then :meth:`start`.

        Raises:
            RuntimeError: when this object did not start the server.
            TimeoutError: see :meth:`start`.
        """
        self._require_process().stop(timeout_s=15.0)
        self.start(timeout_s)

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

    def stop(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL) and delete its cluster folder."""
        if self.process is not None:
            self.process.stop(timeout_s=15.0)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _conninfo(self, database: str) -> str:
        ssl = "".join(f" {k}={v}" for k, v in self.ssl_connect_args.items())
        return f"host={self.host} port={self.port} user={self.user} dbname={database} connect_timeout=2{ssl}"


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


def _network_of(address: str) -> str:
    """Return the subnet (``10.213.1.0/30``) of the interface holding ``address``.

    Falls back to ``address/32`` when ``ip`` is missing or no interface holds it.
    """
    ip = shutil.which("ip")
    if ip is not None:
        shown = subprocess.run(
            [ip, "-o", "-4", "addr", "show"], capture_output=True, text=True, check=False
        )
        for match in re.finditer(r"\binet (\S+)", shown.stdout):
            interface = ipaddress.ip_interface(match.group(1))
            if str(interface.ip) == address:
                return str(interface.network)
    return f"{ipaddress.ip_address(address)}/32"


def start_postgres(
    timeout_s: float = START_TIMEOUT_S,
    *,
    bind_hosts: Sequence[str] = (),
    tls: TLSFiles | None = None,
    client_certs: bool = False,
) -> PostgresServer:
    """Initialise and start a throw-away cluster (fsync off) on a free loopback port.

    The cluster lives in a new folder under the system temporary directory (not pytest's,
    which is 0700 root so ``postgres`` could not traverse it); ``.stop()`` removes it.

    It listens on 127.0.0.1 and on each of ``bind_hosts`` (IPv4 addresses of this machine,
    such as a :class:`~tests.services.netns.NetworkHost`'s ``service_address``, which must
    exist before the server starts); ``pg_hba.conf`` trusts clients from the subnet of each
    such address (that of its interface, else the address alone).

    With ``tls`` (see :func:`tests.services.tls.make_certificates`) it runs with ``ssl=on``
    and ``tls.cert_file``, and ``pg_hba.conf`` rejects every TCP connection without TLS;
    with ``client_certs`` too, a TLS client must also present a certificate that
    ``tls.ca_file`` signed for its user name (``clientcert=verify-full``).

    Raises:
        ServiceUnavailableError: PostgreSQL (``initdb``) or the ``postgres`` user is missing.
        ServiceError: when ``initdb`` fails.
        TimeoutError: when the server does not answer ``SELECT 1`` within ``timeout_s`` seconds.
    """
    bindir = find_bindir()
    if bindir is None:
        raise ServiceUnavailableError(f"PostgreSQL (`initdb`) was not found; {SETUP_HINT}.")
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise ServiceUnavailableError(
                f"There is no `{SUPERUSER}` user to run PostgreSQL; {SETUP_HINT}."
            ) from None
        run_as = SUPERUSER
    workdir = Path(tempfile.mkdtemp(prefix="zw-postgres-"))
    process: ServiceProcess | None = None
    try:
        if run_as is not None:
            os.chown(workdir, owner.pw_uid, owner.pw_gid)
        data = workdir / "data"
        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D", str(data),
                "-U", SUPERUSER,
                "-A", "trust",
                "-E", "UTF8",
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
            timeout=timeout_s,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise ServiceError(
                f"initdb failed with exit status {initdb.returncode}; see its output:\n"
                f"{initdb.stdout}\n{initdb.stderr}"
            )
        extra_hosts = tuple(dict.fromkeys(h for h in bind_hosts if h != "127.0.0.1"))
        if extra_hosts:
            with (data / "pg_hba.conf").open("a") as hba:
                hba.write("# Extra listen addresses (tests.services.postgres, bind_hosts)\n")
                for network in dict.fromkeys(_network_of(h) for h in extra_hosts):
                    hba.write(f"host all all {network} trust\n")
        ssl_argv = _setup_tls(
            workdir, data, tls, client_certs, pwd.getpwnam(run_as) if run_as else None
        )
        port = free_port()
        argv = [
            str(bindir / "postgres"),
            "-D", str(data),
            "-p", str(port),
            "-c", f"listen_addresses={','.join(('127.0.0.1', *extra_hosts))}",
            "-c", f"unix_socket_directories={workdir}",
            "-c", "fsync=off",
            # With fsync off a synchronous commit costs one write(2), and it makes every
            # committed row survive kill() (asynchronous commits can lose the last ~0.6 s).
            "-c", "synchronous_commit=on",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
            *ssl_argv,
        ]  # fmt: skip
        process = ServiceProcess(
            "postgres",
            argv,
            log_path=workdir / "server.log",
            cwd=workdir,
            user=run_as,
            # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM would wait for clients to leave.
            stop_signal=signal.SIGINT,
        )
        server = PostgresServer(
            url_template=f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{{database}}",
            host="127.0.0.1",
            port=port,
            process=process,
            workdir=workdir,
            bind_hosts=extra_hosts,
            tls=tls,
        )
        process.start()
        process.wait_until(lambda: _select_one(server._conninfo("postgres")), timeout_s, "SELECT 1")
    except BaseException:
        if process is not None:
            process.stop(timeout_s=15.0)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return server


def _setup_tls(
    workdir: Path,
    data: Path,
    tls: TLSFiles | None,
    client_certs: bool,
    owner: pwd.struct_passwd | None,
) -> list[str]:
    """Copy the server's certificate files where PostgreSQL can read them, make
    ``pg_hba.conf`` refuse plaintext, and return the ``-c ssl...`` arguments ([] without TLS)."""
    if tls is None:
        return []
    folder = workdir / "tls"
    folder.mkdir()
    files = {}
    for name, source in (("server.pem", tls.cert_file), ("server.key", tls.key_file)):
        files[name] = folder / name
        shutil.copyfile(source, files[name])
    files["ca.pem"] = folder / "ca.pem"
    shutil.copyfile(tls.ca_file, files["ca.pem"])
    # PostgreSQL refuses a key that is not its own or that others may read.
    files["server.key"].chmod(0o600)
    if owner is not None:
        for path in (folder, *files.values()):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    # The first matching line wins: plaintext TCP is rejected before any "host ... trust".
    first = [
        "# TLS only (tests.services.postgres, tls)",
        "hostnossl all all 0.0.0.0/0 reject",
        "hostnossl all all ::/0 reject",
    ]
    if client_certs:
        first += [
            "hostssl all all 0.0.0.0/0 trust clientcert=verify-full",
            "hostssl all all ::/0 trust clientcert=verify-full",
        ]
    hba = data / "pg_hba.conf"
    hba.write_text("\n".join(first) + "\n" + hba.read_text())
    return [
        "-c", "ssl=on",
        "-c", f"ssl_cert_file={files['server.pem']}",
        "-c", f"ssl_key_file={files['server.key']}",
        "-c", f"ssl_ca_file={files['ca.pem']}",
    ]  # fmt: skip


@fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start one PostgreSQL cluster for the test session and remove it afterwards.

    Fails in CI and skips elsewhere when PostgreSQL is not installed.
    """
    yield from serve(start_postgres)


@fixture()
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """SQLAlchemy URL of a new, empty database created for this test alone."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40].strip("_")
    return postgres_server.create_database(f"t_{slug}_{uuid.uuid4().hex[:8]}")
