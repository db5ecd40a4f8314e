"""A real ``redis-server`` on a loopback port, for broker and result-backend tests and benches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.services.process import (
    SETUP_HINT,
    ControlledService,
    ServiceProcess,
    ServiceUnavailableError,
    find_binary,
    fixture,
    free_port,
    serve,
)
from tests.services.tls import TLSFiles

if TYPE_CHECKING:
    import pytest

START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RedisServer(ControlledService):
    """A running redis-server. ``url`` points at database 0 on ``host`` (127.0.0.1).

    It listens on 127.0.0.1 and on each of ``bind_hosts`` (see :meth:`url_for`). When this
    object started the process it can also crash it (:meth:`kill`), bring it back on the
    same port (:meth:`start`, :meth:`restart`) and freeze it (:meth:`pause`). There is no
    persistence, so a restarted server has no keys at all.

    With ``tls`` it speaks TLS only, its URLs are ``rediss://``, and a client passes
    :attr:`ssl_options` (the test CA and client certificate) to redis-py.
    """

    url: str
    port: int
    host: str = "127.0.0.1"
    process: ServiceProcess | None = field(default=None, repr=False, compare=False)
    bind_hosts: tuple[str, ...] = ()
    tls: TLSFiles | None = field(default=None, repr=False, compare=False)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every address it listens on: ``host`` first, then ``bind_hosts``."""
        return (self.host, *self.bind_hosts)

    @property
    def scheme(self) -> str:
        """``rediss`` for a TLS server, else ``redis``."""
        return "rediss" if self.tls is not None else "redis"

    @property
    def ssl_options(self) -> dict[str, str]:
        """redis-py TLS arguments trusting the test CA, with its client certificate ({} without TLS)."""
        return _ssl_options(self.tls)

    def db_url(self, db: int) -> str:
        """Return the URL of logical database ``db`` (0-15) on this server."""
        return f"{self.scheme}://{self.host}:{self.port}/{db}"

    def url_for(self, host: str, db: int = 0) -> str:
        """Return the URL of database ``db`` through listen address ``host``.

        E.g. a worker in a :class:`~tests.services.netns.NetworkHost` uses
        ``url_for(net.service_address)`` while the test itself keeps ``url``.

        Raises:
            ValueError: when the server does not listen on ``host``.
        """
        if host not in self.hosts:
            raise ValueError(f"redis-server listens on {', '.join(self.hosts)}, not on {host}.")
        return f"{self.scheme}://{host}:{self.port}/{db}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server again on the same port and folder; returns once it answers PING.

        Raises:
            RuntimeError: when it is still running or this object did not start it.
            TimeoutError: when it does not answer within ``timeout_s`` seconds (the port may
                have been taken meanwhile; the log tail says).
        """
        process = self._require_process().start()
        try:
            process.wait_until(
                lambda: _ping(self.host, self.port, self.tls), timeout_s, "redis PING"
            )
        except BaseException:
            process.stop()
            raise

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """:meth:`stop` (SIGTERM) and :meth:`start` again; every key is gone afterwards.

        Raises:
            RuntimeError: when this object did not start the process.
            TimeoutError: see :meth:`start`.
        """
        self._require_process().stop()
        self.start(timeout_s)

    def flushall(self) -> None:
        """Delete every key in every database of this server."""
        import redis

        with redis.Redis(
            host=self.host, port=self.port, socket_timeout=5, **self.ssl_options
        ) as client:
            client.flushall()

    def stop(self) -> None:
        """Stop the server process (when this object started one)."""
        if self.process is not None:
            self.process.stop()


def _ssl_options(tls: TLSFiles | None) -> dict[str, str]:
    if tls is None:
        return {}
    return {
        "ssl_ca_certs": str(tls.ca_file),
        "ssl_certfile": str(tls.client_cert_file),
        "ssl_keyfile": str(tls.client_key_file),
    }


def _ping(host: str, port: int, tls: TLSFiles | None = None) -> bool:
    import redis

    with redis.Redis(
        host=host,
        port=port,
        socket_connect_timeout=0.5,
        socket_timeout=1,
        ssl=tls is not None,
        **_ssl_options(tls),
    ) as client:
        return bool(client.ping())


def start_redis(
    workdir: Path,
    timeout_s: float = START_TIMEOUT_S,
    *,
    bind_hosts: Sequence[str] = (),
    tls: TLSFiles | None = None,
    tls_auth_clients: str = "no",
) -> RedisServer:
    """Start ``redis-server`` without persistence in ``workdir``; stop it with ``.stop()``.

    It listens on 127.0.0.1 and on each of ``bind_hosts`` (IPv4 addresses of this machine,
    such as a :class:`~tests.services.netns.NetworkHost`'s ``service_address``). With extra
    addresses protected mode is turned off, since Redis would otherwise refuse every
    non-loopback client that has no password; there is no password.

    With ``tls`` (see :func:`tests.services.tls.make_certificates`) it serves TLS only (no
    plaintext port) with ``tls.cert_file``, trusting ``tls.ca_file`` for client
    certificates, which ``tls_auth_clients`` (``no``, ``optional`` or ``yes``) asks for.

    Raises:
        ServiceUnavailableError: when ``redis-server`` is not installed.
        TimeoutError: when it does not answer PING within ``timeout_s`` seconds (with its log).
    """
    binary = find_binary("redis-server")
    if binary is None:
        raise ServiceUnavailableError(f"`redis-server` was not found on PATH; {SETUP_HINT}.")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    extra_hosts = tuple(dict.fromkeys(h for h in bind_hosts if h != "127.0.0.1"))
    listen = ["--port", str(port)]
    if tls is not None:
        listen = [
            "--port", "0",  # no plaintext port
            "--tls-port", str(port),
            "--tls-cert-file", str(tls.cert_file),
            "--tls-key-file", str(tls.key_file),
            "--tls-ca-cert-file", str(tls.ca_file),
            "--tls-auth-clients", tls_auth_clients,
        ]  # fmt: skip
    argv = [
        binary,
        "--bind", "127.0.0.1", *extra_hosts,
        *(["--protected-mode", "no"] if extra_hosts else []),
        *listen,
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
    ]  # fmt: skip
    process = ServiceProcess("redis-server", argv, log_path=workdir / "redis.log").start()
    try:
        process.wait_until(lambda: _ping("127.0.0.1", port, tls), timeout_s, "redis PING")
    except BaseException:
        process.stop()
        raise
    scheme = "rediss" if tls is not None else "redis"
    return RedisServer(
        url=f"{scheme}://127.0.0.1:{port}/0",
        port=port,
        process=process,
        bind_hosts=extra_hosts,
        tls=tls,
    )


@fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Start one redis-server for the test session (no persistence) and stop it afterwards.

    Fails in CI and skips elsewhere when ``redis-server`` is not installed.
    """
    yield from serve(lambda: start_redis(tmp_path_factory.mktemp("redis")))


@fixture()
def redis_url(redis_server: RedisServer) -> str:
    """URL of database 0 on the session's redis-server, emptied (FLUSHALL) before the test."""
    redis_server.flushall()
    return redis_server.url
