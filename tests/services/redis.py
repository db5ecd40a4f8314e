"""A real ``redis-server`` on a loopback port, for broker and result-backend tests and benches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.services.process import (
    SETUP_HINT,
    ServiceProcess,
    ServiceUnavailableError,
    find_binary,
    fixture,
    free_port,
    serve,
)

if TYPE_CHECKING:
    import pytest

START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server. ``url`` points at database 0."""

    url: str
    port: int
    host: str = "127.0.0.1"
    process: ServiceProcess | None = field(default=None, repr=False, compare=False)

    def db_url(self, db: int) -> str:
        """Return the URL of logical database ``db`` (0-15) on this server."""
        return f"redis://{self.host}:{self.port}/{db}"

    def flushall(self) -> None:
        """Delete every key in every database of this server."""
        import redis

        with redis.Redis(host=self.host, port=self.port, socket_timeout=5) as client:
            client.flushall()

    def stop(self) -> None:
        """Stop the server process (when this object started one)."""
        if self.process is not None:
            self.process.stop()


def _ping(host: str, port: int) -> bool:
    import redis

    with redis.Redis(host=host, port=port, socket_connect_timeout=0.5, socket_timeout=1) as client:
        return bool(client.ping())


def start_redis(workdir: Path, timeout_s: float = START_TIMEOUT_S) -> RedisServer:
    """Start ``redis-server`` without persistence in ``workdir``; stop it with ``.stop()``.

    Raises:
        ServiceUnavailableError: when ``redis-server`` is not installed.
        TimeoutError: when it does not answer PING within ``timeout_s`` seconds (with its log).
    """
    binary = find_binary("redis-server")
    if binary is None:
        raise ServiceUnavailableError(f"`redis-server` was not found on PATH; {SETUP_HINT}.")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
    ]  # fmt: skip
    process = ServiceProcess("redis-server", argv, log_path=workdir / "redis.log").start()
    try:
        process.wait_until(lambda: _ping("127.0.0.1", port), timeout_s, "redis PING")
    except BaseException:
        process.stop()
        raise
    return RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, process=process)


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
