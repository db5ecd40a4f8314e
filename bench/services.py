"""Real services for the benchmarks: Redis, PostgreSQL, SeaweedFS and Celery workers.

The starters are the test suite's own (:mod:`tests.services`, which needs no pytest), so the
benchmarks and the integration tests run services the same way: free loopback ports, one
process group each, output in a log file, the whole group killed on stop. This module adds
the bench's policy on top: children never inherit the caller's ``ZW_*`` settings, and
workers log at WARNING (per-task log lines would slow them down). Nothing starts at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.services.celery import start_celery_worker as _start_celery_worker
from tests.services.postgres import PostgresServer, start_postgres
from tests.services.process import REPO_ROOT, ServiceProcess
from tests.services.process import ServiceError as BenchServiceError
from tests.services.process import service_env as _service_env
from tests.services.redis import RedisServer, start_redis
from tests.services.s3 import S3Server, start_seaweedfs

__all__ = [
    "REPO_ROOT",
    "BenchServiceError",
    "PostgresServer",
    "RedisServer",
    "S3Server",
    "ServiceProcess",
    "service_env",
    "start_celery_worker",
    "start_postgres",
    "start_redis",
    "start_seaweedfs",
]

# The caller's own settings are dropped so that a child runs exactly the stack the bench chose.
_DROPPED_PREFIXES = ("ZW_",)


def service_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without ``ZW_*`` variables, plus ``extra`` and the repo root on PYTHONPATH."""
    return _service_env(extra, drop_prefixes=_DROPPED_PREFIXES)


def start_celery_worker(
    app_module: str,
    queues: Sequence[str],
    concurrency: int,
    env: Mapping[str, str],
    node: str,
    broker_url: str,
    log_dir: Path,
    ready_timeout_s: float = 60.0,
) -> ServiceProcess:
    """Start a prefork ``celery -A app_module worker`` and return once it answers a ping.

    The worker logs at WARNING, so readiness is a control ping to ``node`` (a literal name
    such as ``bench-noop@localhost``) over ``broker_url``.

    Raises:
        TimeoutError: the worker exits or is not ready within ``ready_timeout_s`` seconds.
    """
    return _start_celery_worker(
        app_module,
        queues,
        concurrency,
        env,
        node,
        log_dir=log_dir,
        ready_timeout_s=ready_timeout_s,
        loglevel="WARNING",
        ping_broker_url=broker_url,
        drop_env_prefixes=_DROPPED_PREFIXES,
    )
