"""Encrypted links against real servers: a cluster run over TLS-only Redis, PostgreSQL with
``ssl=on`` and S3 over https, all with certificates this test makes, and the refusals a
plaintext or wrongly configured client meets."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from stores.artifacts import artifact_store_from_uri
from stores.errors import ArtifactStoreError, InfrastructureError, MetadataStoreError
from stores.metadata.store import MetadataStore
from tests.pipelines import cluster as pl
from tests.services.celery import start_celery_worker
from tests.services.flower import start_flower_process
from tests.services.postgres import PostgresServer, start_postgres
from tests.services.process import (
    TEST_SECRET_KEY,
    ServiceProcess,
    ServiceUnavailableError,
    serve,
    service_unavailable,
)
from tests.services.redis import RedisServer, start_redis
from tests.services.s3 import S3Server, start_seaweedfs
from tests.services.tls import TLSFiles, make_certificates
from zenml_workers import Client, submit
from zenml_workers.cli import main
from zenml_workers.errors import BrokerUnavailableError, ConfigurationError
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings, load_settings
from zenml_workers.worker.broker import DeadLetterList

pytestmark = pytest.mark.services


@dataclass
class TLSCluster:
    certs: TLSFiles
    redis: RedisServer
    postgres: PostgresServer
    s3: S3Server
    env: dict[str, str]
    settings: Settings
    worker: ServiceProcess

    def with_env(self, **changes: str) -> Settings:
        """The cluster's settings with some ``ZW_*`` values changed."""
        env = {**self.env, **changes}
        return Settings(**{k[3:].lower(): v for k, v in env.items()})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    try:
        return make_certificates(tmp_path_factory.mktemp("certs"))
    except ServiceUnavailableError as e:
        service_unavailable(str(e))


@pytest.fixture(scope="module")
def tls_redis(certs: TLSFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """TLS only, and every client must show a certificate the test CA signed."""
    workdir = tmp_path_factory.mktemp("redis-tls")
    yield from serve(lambda: start_redis(workdir, tls=certs, tls_auth_clients="yes"))


@pytest.fixture(scope="module")
def tls_postgres(certs: TLSFiles) -> Iterator[PostgresServer]:
    """``ssl=on``, plaintext rejected, client certificates required (``clientcert=verify-full``)."""
    yield from serve(lambda: start_postgres(tls=certs, client_certs=True))


@pytest.fixture(scope="module")
def tls_s3(certs: TLSFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    workdir = tmp_path_factory.mktemp("seaweedfs-tls")
    try:
        yield from serve(lambda: start_seaweedfs(workdir, tls=certs))
    finally:
        for data in workdir.glob("data-*"):
            shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(
    certs: TLSFiles,
    tls_redis: RedisServer,
    tls_postgres: PostgresServer,
    tls_s3: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TLSCluster]:
    logs = tmp_path_factory.mktemp("tls-cluster")
    env = {
        "ZW_BROKER_URL": tls_redis.db_url(3),
        "ZW_BROKER_CA_FILE": str(certs.ca_file),
        "ZW_BROKER_CERT_FILE": str(certs.client_cert_file),
        "ZW_BROKER_KEY_FILE": str(certs.client_key_file),
        "ZW_METADATA_URL": tls_postgres.create_database(f"tls_{uuid.uuid4().hex[:8]}"),
        "ZW_METADATA_CA_FILE": str(certs.ca_file),  # sslmode: verify-full
        "ZW_METADATA_CERT_FILE": str(certs.client_cert_file),
        "ZW_METADATA_KEY_FILE": str(certs.client_key_file),
        "ZW_ARTIFACT_URI": f"s3://{tls_s3.make_bucket()}/artifacts",
        "ZW_S3_ENDPOINT_URL": tls_s3.endpoint_url,
        "ZW_S3_CA_BUNDLE": str(certs.ca_file),
        "ZW_S3_ACCESS_KEY_ID": tls_s3.access_key_id,
        "ZW_S3_SECRET_ACCESS_KEY": tls_s3.secret_access_key,
        "ZW_S3_REGION": tls_s3.region,
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_HEARTBEAT_INTERVAL_S": "1",
        "ZW_HOME": str(logs / "home"),
    }
    settings = Settings(**{k[3:].lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    worker = start_celery_worker(
        "zenml_workers.worker", ["cpu"], 2, env, "cpu@tls", log_dir=logs, drop_env_prefixes=("ZW_",)
    )
    try:
        yield TLSCluster(certs, tls_redis, tls_postgres, tls_s3, env, settings, worker)
    finally:
        close_stacks()
        worker.stop()


def test_tls_cluster_runs_a_pipeline_over_encrypted_links(cluster: TLSCluster) -> None:
    assert cluster.settings.reveal_broker_url().startswith("rediss://")
    assert cluster.settings.s3_endpoint_url and cluster.settings.s3_endpoint_url.startswith(
        "https://"
    )

    run = submit(pl.small, settings=cluster.settings, x=40).wait(timeout_s=60)

    assert run.status == "completed"
    assert {run.steps[s].worker_host for s in run.steps} == {"cpu@tls"}
    last = run.steps["add_one_2"]
    assert last.output.load() == 42
    assert last.output.uri.startswith("s3://")
    database = cluster.env["ZW_METADATA_URL"].rsplit("/", 1)[1]
    with psycopg.connect(cluster.postgres._conninfo("postgres")) as conn:
        links = conn.execute(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.datname = %s",
            (database,),
        ).fetchall()
    assert links and all(ssl for (ssl,) in links)  # the worker's and this process's


def test_tls_flower_sees_workers_tasks_and_queues_over_the_tls_broker(
    cluster: TLSCluster, tmp_path: Path
) -> None:
    broker_only = {k: v for k, v in cluster.env.items() if k.startswith("ZW_BROKER_")}
    flower = start_flower_process(cluster.env["ZW_BROKER_URL"], log_dir=tmp_path, env=broker_only)
    try:
        flower.wait_for_worker("cpu@tls")  # worker events arrive over TLS
        run = submit(pl.small, settings=cluster.settings, x=1).wait(timeout_s=60)
        assert run.status == "completed"
        # The broker tab's data: Flower's own Redis client, given Celery's broker_use_ssl.
        queues = flower.get_json("/api/queues/length")["active_queues"]
        assert {q["name"] for q in queues} == {"cpu"}
        flower.process.wait_until(
            lambda: len(flower.tasks()) >= len(run.steps), 30, "the run's tasks in Flower"
        )
    finally:
        flower.process.stop()
    assert "Traceback" not in flower.process.log_text()


def test_tls_redis_refuses_a_plaintext_client(cluster: TLSCluster) -> None:
    plain = f"redis://127.0.0.1:{cluster.redis.port}/3"

    with (
        redis.Redis.from_url(plain, socket_timeout=2) as client,
        pytest.raises(redis.ConnectionError),
    ):
        client.ping()
    with pytest.raises(BrokerUnavailableError):
        DeadLetterList.from_url(plain).newest(1)


def test_tls_broker_with_the_wrong_ca_is_refused_with_a_sentence(
    cluster: TLSCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wrong = cluster.with_env(ZW_BROKER_CA_FILE=str(cluster.certs.wrong_ca_file))

    with pytest.raises(ConfigurationError) as info:
        DeadLetterList.from_url(cluster.env["ZW_BROKER_URL"], wrong.broker_ssl_options()).newest(1)
    assert str(info.value).startswith(
        f"could not read zw:dead-letter: the TLS connection to the broker (Redis) at "
        f"{cluster.env['ZW_BROKER_URL']} failed ([SSL: CERTIFICATE_VERIFY_FAILED] certificate "
        "verify failed"
    )
    assert "set ZW_BROKER_CA_FILE to the CA certificate" in str(info.value)

    # The same sentence reaches an operator through `zw`, from the environment alone.
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ZW_BROKER_CA_FILE", str(cluster.certs.wrong_ca_file))
    with pytest.raises(SystemExit) as exited:
        main(["dead-letters"])
    assert exited.value.code == 1
    assert "the TLS connection to the broker (Redis)" in capsys.readouterr().err


def test_tls_worker_with_the_wrong_broker_ca_fails_at_start(
    cluster: TLSCluster, tmp_path: Path
) -> None:
    # Celery alone retries the broker connection forever at start-up: a certificate that
    # never verifies must stop `zw worker` with the sentence instead.
    env = {
        **os.environ,
        **cluster.env,
        "ZW_BROKER_CA_FILE": str(cluster.certs.wrong_ca_file),
        "ZW_HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "worker", "--queues", "cpu", "-n", "ca@t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "the worker cannot start: the TLS connection to the broker (Redis)" in done.stderr
    assert "set ZW_BROKER_CA_FILE to the CA certificate" in done.stderr
    assert "celery@" not in done.stdout + done.stderr  # no Celery banner: it never started


def test_tls_submit_with_the_wrong_broker_ca_logs_the_sentence(
    cluster: TLSCluster, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = cluster.with_env(ZW_BROKER_CA_FILE=str(cluster.certs.wrong_ca_file))

    # After the cluster's own runs: kombu's process-wide connection pool must not lend this
    # app a connection that the right CA verified.
    with caplog.at_level(logging.ERROR, logger="zenml_workers.worker"):
        submit(pl.small, settings=wrong, x=1)

    refusals = [r.getMessage() for r in caplog.records if "TLS connection" in r.getMessage()]
    assert refusals and "the broker (Redis)" in refusals[0]
    assert "step task(s) recorded as unsent" in refusals[0]


def test_tls_postgres_refuses_a_plaintext_client(cluster: TLSCluster) -> None:
    url = cluster.env["ZW_METADATA_URL"]
    plain = MetadataStore(url, connect_args={"sslmode": "disable"})

    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(
            f"host=127.0.0.1 port={cluster.postgres.port} user=postgres dbname=postgres "
            "sslmode=disable connect_timeout=2"
        )
    try:
        with pytest.raises(MetadataStoreError) as info, plain.read():
            pass
    finally:
        plain.dispose()
    assert not isinstance(info.value, InfrastructureError)
    assert "the metadata store (PostgreSQL)" in str(info.value)
    assert str(info.value).endswith(
        "the server accepts TLS connections only: set ZW_METADATA_SSLMODE=verify-full and "
        "ZW_METADATA_CA_FILE"
    )


def test_tls_metadata_store_with_the_wrong_ca_is_refused_with_a_sentence(
    cluster: TLSCluster,
) -> None:
    wrong = cluster.with_env(ZW_METADATA_CA_FILE=str(cluster.certs.wrong_ca_file))

    with pytest.raises(MetadataStoreError) as info:
        Client(wrong).list_runs(limit=1)

    # Not an outage: workers would retry that for ZW_INFRA_RETRY_BUDGET_S.
    assert not isinstance(info.value, InfrastructureError)
    assert str(info.value) == (
        f"the TLS connection to the metadata store (PostgreSQL) at {cluster.env['ZW_METADATA_URL']} "
        "failed (SSL error: certificate verify failed); set ZW_METADATA_CA_FILE to the CA "
        "certificate (a PEM file) that signed the server's certificate, or renew a certificate "
        "that expired"
    )


def test_tls_s3_with_the_wrong_ca_is_refused_with_a_sentence(cluster: TLSCluster) -> None:
    wrong = cluster.with_env(ZW_S3_CA_BUNDLE=str(cluster.certs.wrong_ca_file))
    store = artifact_store_from_uri(cluster.env["ZW_ARTIFACT_URI"], **wrong.s3_options())

    with pytest.raises(ArtifactStoreError) as info:
        store.check()

    assert not isinstance(info.value, InfrastructureError)
    assert str(info.value).startswith(
        f"The TLS connection to S3 at {cluster.s3.endpoint_url} failed ("
    )
    assert "certificate verify failed" in str(info.value)
    assert "set ZW_S3_CA_BUNDLE to the CA certificate" in str(info.value)
    artifact_store_from_uri(cluster.env["ZW_ARTIFACT_URI"], **cluster.settings.s3_options()).check()


def test_tls_links_work_from_a_stack_file(cluster: TLSCluster, tmp_path: Path) -> None:
    stack = tmp_path / "stack.toml"
    stack.write_text(
        "[stack]\n"
        + "".join(
            f'{k[3:].lower()} = "{v}"\n'
            for k, v in cluster.env.items()
            if k.startswith(("ZW_METADATA_", "ZW_BROKER_"))
        )
    )
    settings = load_settings(stack)

    store = MetadataStore(
        settings.resolved_metadata_url(), connect_args=settings.metadata_connect_args()
    )
    try:
        with store.read():
            pass
    finally:
        store.dispose()
    dead = DeadLetterList.from_url(settings.reveal_broker_url(), settings.broker_ssl_options())
    try:
        assert dead.newest(1) == []
    finally:
        dead.client.close()
