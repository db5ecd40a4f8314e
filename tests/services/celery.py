"""Celery worker processes for integration tests: real ``celery worker`` subprocesses."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.services.process import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0


def service_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``os.environ`` plus ``env``, with the repository root on ``PYTHONPATH``.

    The root is needed so that ``-A tests.services.noop_app`` and the project import in the
    child no matter where pytest was started.
    """
    merged = dict(os.environ)
    merged.update(env or {})
    paths = [str(REPO_ROOT), *filter(None, merged.get("PYTHONPATH", "").split(os.pathsep))]
    merged["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    merged.setdefault("PYTHONUNBUFFERED", "1")
    return merged


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
) -> ServiceProcess:
    """Start ``celery -A app_module worker`` and return once it logs that it is ready.

    The worker sends task events (``-E``) so Flower can see its tasks, and skips mingle and
    gossip, which only slow start-up down. Stop it with ``.stop()`` (warm shutdown, then
    SIGKILL of the process group) or use the :func:`celery_worker_factory` fixture.

    Args:
        app_module: importable module (or ``module:attr``) holding the Celery app.
        queues: queues to consume, e.g. ``["cpu"]``.
        concurrency: number of pool processes/threads.
        env: extra environment for the worker (broker URL, settings), merged over os.environ.
        hostname: node name such as ``"cpu1@%h"``; must be unique among running workers.
        pool: ``prefork``, ``solo`` or ``threads``.
        log_dir: where the log file goes; a new temporary directory when None.
        extra_args: more ``celery worker`` arguments.
        ready_timeout_s: how long to wait for the "ready" log line, in seconds.

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
        "--loglevel=INFO",
        *extra_args,
    ]  # fmt: skip
    process = ServiceProcess(
        f"celery worker {hostname}",
        argv,
        log_path=log_dir / f"worker-{safe_name}.log",
        env=service_env(env),
        cwd=REPO_ROOT,
    ).start()
    try:
        # Celery logs "<hostname> ready." once the consumer is attached to its queues.
        process.wait_for_log(" ready.", ready_timeout_s)
    except BaseException:
        process.stop()
        raise
    return process


@pytest.fixture
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
