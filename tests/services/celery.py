"""Celery worker processes for integration tests and benches: real ``celery worker`` subprocesses."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.services.process import REPO_ROOT, ServiceProcess, fixture, service_env

__all__ = [
    "READY_TIMEOUT_S",
    "REPO_ROOT",
    "celery_worker_factory",
    "service_env",
    "start_celery_worker",
]

READY_TIMEOUT_S = 60.0


def _answers_ping(app: Any, node: str) -> bool:
    replies = app.control.ping(destination=[node], timeout=0.5)
    return any(node in reply for reply in replies)


def start_celery_worker(
    app_module: str,
    queues: Sequence[str],
    concurrency: int,
    env: Mapping[str, str] | None,
    hostname: str,
    pool: str = "prefork",
    *,
    log_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = READY_TIMEOUT_S,
    loglevel: str = "INFO",
    ping_broker_url: str | None = None,
    drop_env_prefixes: Sequence[str] = (),
) -> ServiceProcess:
    """Start ``celery -A app_module worker`` and return once it is ready.

    Ready means the worker logged ``"<hostname> ready."`` (logged at INFO), or, when
    ``ping_broker_url`` is given, that it answered a control ping over that broker (which
    works at any ``loglevel``). The worker sends task events (``-E``) so Flower can see its
    tasks, and skips mingle and gossip, which only slow start-up down. Stop it with
    ``.stop()`` (warm shutdown, then SIGKILL of the process group) or use the
    :func:`celery_worker_factory` fixture.

    Args:
        app_module: importable module (or ``module:attr``) holding the Celery app.
        queues: queues to consume, e.g. ``["cpu"]``.
        concurrency: number of pool processes/threads.
        env: extra environment for the worker (broker URL, settings), merged over os.environ.
        hostname: node name such as ``"cpu1@%h"``; must be unique among running workers
            (and literal, without ``%h``, when ``ping_broker_url`` is given).
        pool: ``prefork``, ``solo`` or ``threads``.
        log_dir: where the log file goes; a new temporary directory when None.
        extra_args: more ``celery worker`` arguments.
        ready_timeout_s: how long to wait for readiness, in seconds.
        loglevel: the worker's ``--loglevel`` (``WARNING`` keeps per-task lines out of a bench).
        ping_broker_url: check readiness with a control ping over this broker URL.
        drop_env_prefixes: leave variables with these prefixes (e.g. ``"ZW_"``) of
            ``os.environ`` out of the worker's environment; see :func:`service_env`.

    Raises:
        TimeoutError: when the worker is not ready in time or exits (with its log tail).
    """
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="zw-celery-"))
    safe_name = hostname.replace("%", "").replace("@", "_")
    argv = [
        sys.executable, "-m", "celery", "-A", app_module, "worker",
        "-Q", ",".join(queues),
        "-n", hostname,
        "-c", str(concurrency),
        "-P", pool,
        "--without-mingle", "--without-gossip", "-E",
        f"--loglevel={loglevel}",
        *extra_args,
    ]  # fmt: skip
    process = ServiceProcess(
        f"celery worker {hostname}",
        argv,
        log_path=log_dir / f"worker-{safe_name}.log",
        env=service_env(env, drop_prefixes=drop_env_prefixes),
        cwd=REPO_ROOT,
    ).start()
    try:
        if ping_broker_url is None:
            # Celery logs "<hostname> ready." once the consumer is attached to its queues.
            process.wait_for_log(" ready.", ready_timeout_s)
        else:
            _wait_for_ping(process, ping_broker_url, hostname, ready_timeout_s)
    except BaseException:
        process.stop()
        raise
    return process


def _wait_for_ping(process: ServiceProcess, broker_url: str, node: str, timeout_s: float) -> None:
    from celery import Celery

    pinger = Celery("zw-ready-ping", broker=broker_url, set_as_current=False)
    try:
        process.wait_until(
            lambda: _answers_ping(pinger, node), timeout_s, f"{node} to answer a ping"
        )
    finally:
        pinger.close()


@fixture()
def celery_worker_factory(
    tmp_path: Path,
) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory with :func:`start_celery_worker`'s signature; stops every worker at teardown."""
    started: list[ServiceProcess] = []

    def start(*args: object, **kwargs: object) -> ServiceProcess:
        kwargs.setdefault("log_dir", tmp_path)
        process = start_celery_worker(*args, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()
