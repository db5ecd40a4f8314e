"""The real-service fixtures work: each service answers, and they work together."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services.flower import FlowerServer
from tests.services.netns import NetworkHost, cleanup_stale_hosts
from tests.services.postgres import PostgresServer, start_postgres
from tests.services.process import (
    ServiceProcess,
    ServiceUnavailableError,
    free_port,
    service_unavailable,
    wait_until,
)
from tests.services.redis import RedisServer, start_redis
from tests.services.s3 import S3Server, start_seaweedfs

pytestmark = pytest.mark.services


def test_service_process_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); print('started', flush=True); time.sleep(300)"
    process = ServiceProcess(
        "sleeper", [sys.executable, "-c", script], log_path=tmp_path / "sleeper.log"
    ).start()
    process.wait_for_log("started", timeout_s=30)

    process.stop(timeout_s=5)

    # SIGKILL is delivered asynchronously and an orphan stays a zombie until init reaps it.
    wait_until(lambda: not _live_group_members(process.pid), 10, "the process group to die")


def _live_group_members(pgid: int) -> list[int]:
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in {"Z", "X"}:
            live.append(int(stat.parent.name))
    return live


def test_service_process_wait_reports_exit_and_log_tail(tmp_path: Path) -> None:
    process = ServiceProcess(
        "crasher",
        [sys.executable, "-c", "print('boom: bad config', flush=True); raise SystemExit(3)"],
        log_path=tmp_path / "crasher.log",
    ).start()

    with pytest.raises(TimeoutError, match=r"(?s)the process exited.*boom: bad config"):
        process.wait_until(lambda: False, timeout_s=30, what="never")
    assert process.returncode == 3


def test_service_process_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); time.sleep(300)"
    process = ServiceProcess(
        "stubborn", [sys.executable, "-c", script], log_path=tmp_path / "stubborn.log"
    ).start()
    process.wait_for_log("armed", timeout_s=30)

    assert process.stop(timeout_s=0.5) == -signal.SIGKILL


def test_free_port_returns_a_bindable_loopback_port() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_redis_server_answers_ping_set_get(redis_server: RedisServer, redis_url: str) -> None:
    import redis

    assert redis_url == redis_server.url
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping() is True
        client.set("zw:test", b"value")
        assert client.get("zw:test") == b"value"


def test_postgres_databases_are_separate(postgres_server: PostgresServer) -> None:
    from sqlalchemy import create_engine, inspect, text

    suffix = uuid.uuid4().hex[:8]
    first = postgres_server.create_database(f"first_{suffix}")
    second = postgres_server.create_database(f"second_{suffix}")
    assert first.startswith("postgresql+psycopg://postgres@127.0.0.1:")

    engines = [create_engine(first), create_engine(second)]
    try:
        for engine in engines:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
        with engines[0].begin() as conn:
            conn.execute(text("CREATE TABLE only_in_first (id integer)"))
        assert inspect(engines[0]).has_table("only_in_first")
        assert not inspect(engines[1]).has_table("only_in_first")
    finally:
        for engine in engines:
            engine.dispose()


def test_postgres_url_is_a_fresh_empty_database(postgres_url: str) -> None:
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar_one()
        assert postgres_url.endswith("/" + name)
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_celery_worker_runs_task_and_flower_lists_it(
    redis_url: str,
    celery_worker_factory: Callable[..., ServiceProcess],
    start_flower: Callable[..., FlowerServer],
) -> None:
    from celery import Celery

    hostname = f"noop-{uuid.uuid4().hex[:6]}@localhost"
    worker = celery_worker_factory(
        "tests.services.noop_app",
        ["noopq"],
        1,
        {"ZW_BROKER_URL": redis_url},
        hostname,
    )
    flower = start_flower(redis_url, "tests.services.noop_app")
    flower.wait_for_worker(hostname)

    client = Celery("client", broker=redis_url, backend=redis_url)
    client.conf.broker_connection_retry_on_startup = True
    try:
        result = client.send_task("tests.noop", args=[42], queue="noopq")
        assert result.get(timeout=30) == 42
        task_id = result.id
    finally:
        client.close()

    def flower_shows_success() -> bool:
        task = flower.tasks().get(task_id)
        return task is not None and task.get("state") == "SUCCESS"

    wait_until(
        flower_shows_success,
        timeout_s=30,
        what=f"Flower to list task {task_id} as SUCCESS",
        log_tail=flower.process.log_tail,
    )
    task = flower.tasks()[task_id]
    assert task["name"] == "tests.noop"
    assert task["worker"] == hostname
    assert worker.is_running()


# ---- restarts, pauses and network hosts (the fault-injection layer) --------------------------


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, so restarting it disturbs no other test."""
    try:
        server = start_redis(tmp_path / "redis")
    except ServiceUnavailableError as e:
        service_unavailable(str(e))
    try:
        yield server
    finally:
        server.stop()


def test_redis_server_restart_comes_back_on_the_same_port_without_keys(
    own_redis: RedisServer,
) -> None:
    import redis

    with redis.Redis.from_url(own_redis.url) as client:
        client.set("zw:before", b"1")
        assert own_redis.process is not None
        old_pid = own_redis.process.pid

        own_redis.restart()

        assert own_redis.process.pid != old_pid
        assert own_redis.url == f"redis://127.0.0.1:{own_redis.port}/0"
        assert client.ping() is True  # the client reconnects on its own
        assert client.dbsize() == 0
        client.set("zw:after-restart", b"2")

        own_redis.kill()
        assert not own_redis.is_running()
        own_redis.start()

        assert client.dbsize() == 0


def test_redis_server_pause_hangs_clients_and_resume_answers(own_redis: RedisServer) -> None:
    import redis

    own_redis.pause()
    try:
        with (
            redis.Redis.from_url(own_redis.url, socket_timeout=0.3) as client,
            pytest.raises(redis.TimeoutError),
        ):
            client.ping()
    finally:
        own_redis.resume()
    with redis.Redis.from_url(own_redis.url, socket_timeout=2) as client:
        assert client.ping() is True


@pytest.fixture()
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test alone, so crashing it disturbs no other test."""
    try:
        server = start_postgres()
    except ServiceUnavailableError as e:
        service_unavailable(str(e))
    try:
        yield server
    finally:
        server.stop()


def test_postgres_server_kill_and_start_keep_databases_and_rows(
    own_postgres: PostgresServer,
) -> None:
    from sqlalchemy import create_engine, text

    url = own_postgres.create_database("kept")
    engine = create_engine(url, pool_pre_ping=True)  # pre-ping replaces connections the crash cut
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (id integer PRIMARY KEY)"))
            conn.execute(text("INSERT INTO t VALUES (1), (2)"))
        port = own_postgres.port

        own_postgres.kill()
        assert not own_postgres.is_running()
        own_postgres.start()

        assert own_postgres.port == port
        with engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 2
            conn.execute(text("INSERT INTO t VALUES (3)"))

        own_postgres.restart()

        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 3
    finally:
        engine.dispose()


def test_s3_server_kill_and_start_keep_objects(tmp_path: Path) -> None:
    try:
        server = start_seaweedfs(tmp_path / "weed")
    except ServiceUnavailableError as e:
        service_unavailable(str(e))
    try:
        bucket = server.make_bucket()
        server.client().put_object(Bucket=bucket, Key="k", Body=b"kept")
        endpoint = server.endpoint_url

        server.kill()
        assert not server.is_running()
        server.start()

        assert server.endpoint_url == endpoint
        body = server.client().get_object(Bucket=bucket, Key="k")["Body"].read()
        assert body == b"kept"
    finally:
        server.stop()


def _connect_argv(host: str, port: int, timeout_s: float = 1.0) -> list[str]:
    """A command that exits 0 once it opened a TCP connection to host:port, else fails."""
    code = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()"
    return [sys.executable, "-c", code, host, str(port), str(timeout_s)]


def test_network_host_reaches_redis_until_partitioned_and_after_heal(
    network_host_factory: Callable[..., NetworkHost], tmp_path: Path
) -> None:
    import redis

    net = network_host_factory()
    assert net.address.startswith("10.213.") and net.service_address.endswith(".1")
    redis_server = start_redis(tmp_path / "redis", bind_hosts=[net.service_address])
    try:
        assert redis_server.url_for(net.service_address).startswith(
            f"redis://{net.service_address}:"
        )
        ping = ["redis-cli", "-h", net.service_address, "-p", str(redis_server.port), "ping"]
        assert net.run(ping).stdout.strip() == "PONG"

        net.partition()
        cut = net.run(_connect_argv(net.service_address, redis_server.port))
        assert cut.returncode != 0 and "TimeoutError" in cut.stderr
        with redis.Redis.from_url(redis_server.url, socket_timeout=2) as client:
            assert client.ping() is True  # this machine is not cut off

        net.heal()
        assert net.run(ping).stdout.strip() == "PONG"
    finally:
        redis_server.stop()

    net.destroy()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert net.namespace not in namespaces
    assert not net.exists()
    net.destroy()  # idempotent


def test_network_host_process_has_its_hostname_and_stop_kills_its_group(
    network_host_factory: Callable[..., NetworkHost], tmp_path: Path
) -> None:
    net = network_host_factory(hostname="vm-a")
    script = "import socket, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); print('on', socket.gethostname(), flush=True); time.sleep(300)"
    process = ServiceProcess(
        "sleeper in netns",
        net.argv_in([sys.executable, "-c", script], hostname="vm-b"),
        log_path=tmp_path / "sleeper.log",
    ).start()
    process.wait_for_log("on vm-b", timeout_s=30)
    assert net.run(["hostname"]).stdout.strip() == "vm-a"
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() != "vm-b"

    process.stop(timeout_s=5)

    wait_until(lambda: not _live_group_members(process.pid), 10, "the process group to die")


def test_postgres_server_bound_to_a_network_host_trusts_its_clients(
    network_host_factory: Callable[..., NetworkHost],
) -> None:
    net = network_host_factory()
    try:
        server = start_postgres(bind_hosts=[net.service_address])
    except ServiceUnavailableError as e:
        service_unavailable(str(e))
    try:
        server.create_database("shared")
        conninfo = f"host={net.service_address} port={server.port} user={server.user} dbname=shared connect_timeout=2"
        code = "import psycopg, sys; print(psycopg.connect(sys.argv[1]).execute('SELECT 41 + 1').fetchone()[0])"
        done = net.run([sys.executable, "-c", code, conninfo])
        assert done.stdout.strip() == "42", done.stderr
        assert server.url_for(net.service_address, "shared").endswith(
            f"@{net.service_address}:{server.port}/shared"
        )
    finally:
        server.stop()


def test_s3_server_bound_to_a_network_host_serves_it_and_this_machine(
    network_host_factory: Callable[..., NetworkHost], tmp_path: Path
) -> None:
    net = network_host_factory()
    other = network_host_factory()
    try:
        server: S3Server = start_seaweedfs(tmp_path / "weed", bind_hosts=[net.service_address])
    except ServiceUnavailableError as e:
        service_unavailable(str(e))
    try:
        assert server.endpoint_url == f"http://{net.service_address}:{server.ports[6]}"
        assert server.url_for(net.service_address) == server.endpoint_url
        with pytest.raises(ValueError, match="listens on"):
            server.url_for("127.0.0.1")
        bucket = server.make_bucket()  # from this machine, through the namespace's link address
        s3_port = int(server.endpoint_url.rsplit(":", 1)[1])
        assert net.run(_connect_argv(net.service_address, s3_port)).returncode == 0

        # A second host reaches the single-address server once routed through its own link.
        assert other.run(_connect_argv(net.service_address, s3_port)).returncode != 0
        other.add_route(net.service_address)
        assert other.run(_connect_argv(net.service_address, s3_port)).returncode == 0
        net.partition()
        assert other.run(_connect_argv(net.service_address, s3_port)).returncode == 0
        assert server.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    finally:
        server.stop()


def test_network_host_cleanup_removes_namespaces_of_dead_runs(
    network_host_factory: Callable[..., NetworkHost],
) -> None:
    network_host_factory()  # skips or fails like the fixture when namespaces cannot be made
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = f"zwt-{gone.pid}-254"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale_hosts()
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale not in namespaces
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
