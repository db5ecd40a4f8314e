"""A client and workers on different metadata stores, sharing one Redis (issue 8, item 5).

The observed case: a second terminal without ``ZW_HOME`` made the client plan its run in its
own SQLite file while the workers used PostgreSQL. A worker now refuses such a message before
the claim, naming both stores; it keeps serving; ``wait()`` says so instead of blaming missing
workers; and the store the run lives in gets it done once a worker of its own consumes the
queue (its scheduler resends the refused message, which left the broker).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from stores.metadata import queries as q
from stores.metadata.store import redact_url
from tests.pipelines import autoscale as pl
from tests.services.process import (
    REPO_ROOT,
    TEST_SECRET_KEY,
    ServiceProcess,
    service_env,
    wait_until,
)
from zenml_workers import submit
from zenml_workers.errors import NoWorkerForQueueError, StoreMismatchError
from zenml_workers.sdk.stack import close_stacks, get_stack
from zenml_workers.settings import Settings
from zenml_workers.worker.broker import DeadLetter, DeadLetterList

pytestmark = pytest.mark.services

REDIS_DB = 12
READY_TIMEOUT_S = 60.0


def _zw(name: str, args: list[str], env: dict[str, str], logs: Path) -> ServiceProcess:
    return ServiceProcess(
        name,
        [sys.executable, "-m", "zenml_workers.cli", *args],
        log_path=logs / f"{name.replace(' ', '-').replace('@', '_')}-{uuid.uuid4().hex[:6]}.log",
        env=service_env(env, drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
    ).start()


@dataclass
class TwoStores:
    """The workers' environment (PostgreSQL), the client's (its own SQLite under its ZW_HOME)
    and the client's settings, on one Redis database."""

    worker_env: dict[str, str]
    client_env: dict[str, str]
    client: Settings
    pg_url: str
    broker: str
    logs: Path


@pytest.fixture()
def stores(redis_server, postgres_server, tmp_path: Path) -> Iterator[TwoStores]:
    """The workers' environment (PostgreSQL) and the client's settings (its own SQLite file
    under its ZW_HOME), on one Redis database, emptied first."""
    broker = redis_server.db_url(REDIS_DB)
    redis.Redis.from_url(broker).flushdb()
    shared = {
        "ZW_BROKER_URL": broker,
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_ARTIFACT_URI": str(tmp_path / "artifacts"),
        "ZW_HEARTBEAT_INTERVAL_S": "1",
        "ZW_WORKER_TTL_S": "4",
        "ZW_BROKER_CHECK_AFTER_S": "1",
        "ZW_SCHEDULER_INTERVAL_S": "0.5",
    }
    pg_url = postgres_server.create_database(f"stores_{uuid.uuid4().hex[:8]}")
    worker_env = {**shared, "ZW_METADATA_URL": pg_url, "ZW_HOME": str(tmp_path / "worker-home")}
    client_home = tmp_path / "client-home"
    client_env = {**shared, "ZW_HOME": str(client_home)}  # no ZW_METADATA_URL: its own SQLite
    client = Settings(
        broker_url=broker,
        secret_key=SecretStr(TEST_SECRET_KEY),
        artifact_uri=shared["ZW_ARTIFACT_URI"],
        home=client_home,
        heartbeat_interval_s=1,
        worker_ttl_s=4,
    )
    try:
        yield TwoStores(worker_env, client_env, client, pg_url, broker, tmp_path)
    finally:
        close_stacks()


def test_store_identity_worker_on_another_store_refuses_and_wait_names_both(
    stores: TwoStores, capfd: pytest.CaptureFixture[str]
) -> None:
    worker = _zw(
        "zw worker pg",
        ["worker", "-Q", "cpu", "-c", "1", "-n", "cpu@pgstore", "--loglevel", "INFO"],
        stores.worker_env,
        stores.logs,
    )
    try:
        worker.wait_for_log(" ready.", READY_TIMEOUT_S)
        client = stores.client
        handle = submit(pl.single, settings=client)
        dead = DeadLetterList.from_url(stores.broker)
        wait_until(
            lambda: dead.newest(10),
            READY_TIMEOUT_S,
            "the worker to refuse the message",
            log_tail=worker.log_tail,
        )
        # The refusal came over the broker before wait() started: wait() shows it at once
        # and, at its deadline, raises it instead of "no live worker consumes queue 'cpu'".
        with pytest.raises(StoreMismatchError) as raised:
            handle.wait(timeout_s=1.0)
        assert not isinstance(raised.value, NoWorkerForQueueError)
        sentence = str(raised.value)
        client_store = get_stack(client).metadata
        assert client_store.redacted_url in sentence
        assert redact_url(stores.pg_url) in sentence
        assert f"refused run {handle.id} step one" in sentence
        assert "ZW_METADATA_URL" in sentence
        shown = "".join(capfd.readouterr())
        # Warned with the refusal, not told to start a worker (the progress line may still
        # say what the client's own store sees: no worker of its own consumes 'cpu').
        assert sentence in shown
        assert "start one with `zw worker --queues cpu`" not in shown

        # The worker refused it before the claim, logged the sentence once, and serves on.
        letters = dead.newest(10)
        assert len(letters) == 1 and isinstance(letters[0], DeadLetter)
        assert letters[0].reason == sentence and letters[0].queue == "cpu"
        log = worker.log_text()
        assert sentence in log
        assert "NoResultFound" not in log and "Traceback" not in log
        assert worker.is_running()
        with client_store.read() as s:
            step = q.step_runs(s, handle.id)[0]
        assert (step.status, step.attempt) == ("queued", 0)
    finally:
        worker.stop()


def test_store_identity_refused_step_is_resent_by_its_own_store_and_completes(
    stores: TwoStores,
) -> None:
    """The refused message was acked off the broker, so the scheduler of the run's own store
    resends it after ZW_BROKER_CHECK_AFTER_S; a worker on that store then runs it."""
    logs = stores.logs
    wrong = _zw(
        "zw worker pg",
        ["worker", "-Q", "cpu", "-c", "1", "-n", "cpu@pgstore"],
        stores.worker_env,
        logs,
    )
    procs = [wrong]
    try:
        wrong.wait_for_log(" ready.", READY_TIMEOUT_S)
        handle = submit(pl.single, settings=stores.client, x=7)
        dead = DeadLetterList.from_url(stores.broker)
        wait_until(lambda: dead.newest(10), READY_TIMEOUT_S, "the refusal", log_tail=wrong.log_tail)
        wrong.stop()
        client_env = stores.client_env
        right = _zw(
            "zw worker sqlite",
            ["worker", "-Q", "cpu", "-c", "1", "-n", "cpu@own"],
            client_env,
            logs,
        )
        procs.append(right)
        right.wait_for_log(" ready.", READY_TIMEOUT_S)
        scheduler = _zw("zw scheduler", ["scheduler"], client_env, logs)
        procs.append(scheduler)
        run = handle.wait(timeout_s=READY_TIMEOUT_S)
        assert run.status == "completed"
        assert run.steps["one"].worker_host == "cpu@own"
        assert "sent again" in scheduler.log_text()
    finally:
        for proc in reversed(procs):
            proc.stop()
