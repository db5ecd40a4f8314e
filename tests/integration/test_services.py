"""The real-service fixtures work: each service answers, and they work together."""

from __future__ import annotations

import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.services.flower import FlowerServer
from tests.services.postgres import PostgresServer
from tests.services.process import ServiceProcess, free_port, wait_until
from tests.services.redis import RedisServer

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
