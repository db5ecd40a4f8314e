"""Session-wide fixtures: real services, started lazily by the tests that request them."""

from __future__ import annotations

from tests.services.celery import celery_worker_factory  # noqa: F401
from tests.services.flower import start_flower  # noqa: F401
from tests.services.mlflow import mlflow_server  # noqa: F401
from tests.services.netns import network_host_factory  # noqa: F401
from tests.services.postgres import postgres_server, postgres_url  # noqa: F401
from tests.services.redis import redis_server, redis_url  # noqa: F401
from tests.services.s3 import s3_server  # noqa: F401
