"""A real ``redis-server`` on a loopback port, for broker and result-backend tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.services.process import ServiceProcess, free_port, require_binary

START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server. ``url`` points at database 0."""

    url: str
    port: int
    host: str = "127.0.0.1"

    def db_url(self, db: int) -> str:
        """Return the URL of logical database ``db`` (0-15) on this server."""
        return f"redis://{self.host}:{self.port}/{db}"

    def flushall(self) -> None:
        """Delete every key in every database of this server."""
        import redis

        with redis.Redis(host=self.host, port=self.port, socket_timeout=5) as client:
            client.flushall()


def _ping(host: str, port: int) -> bool:
    import redis

    with redis.Redis(host=host, port=port, socket_connect_timeout=0.5, socket_timeout=1) as client:
        return bool(client.ping())


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Start one redis-server for the test session (no persistence) and stop it afterwards.

    Fails in CI and skips elsewhere when ``redis-server`` is not installed.
    """
    binary = require_binary("redis-server")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = ServiceProcess(
        "redis-server",
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        log_path=workdir / "redis.log",
    ).start()
    try:
        process.wait_until(lambda: _ping("127.0.0.1", port), START_TIMEOUT_S, "redis PING")
        yield RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port)
    finally:
        process.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of database 0 on the session's redis-server, emptied (FLUSHALL) before the test."""
    redis_server.flushall()
    return redis_server.url
