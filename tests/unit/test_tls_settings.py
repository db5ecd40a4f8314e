"""Unit tests for encrypted links: the TLS settings, what they hand to each driver, and how
TLS failures are told apart from outages (no network)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import redis
from sqlalchemy import event, exc

from stores import tls
from stores.artifacts import artifact_store_from_uri
from stores.artifacts.s3 import S3ArtifactStore
from stores.errors import (
    ArtifactStoreError,
    ArtifactStoreUnavailableError,
    InfrastructureError,
    MetadataStoreError,
    MetadataStoreUnavailableError,
)
from stores.metadata.store import MetadataStore
from zenml_workers.errors import BrokerUnavailableError, ConfigurationError
from zenml_workers.settings import Settings, load_settings
from zenml_workers.worker.broker import DeadLetterList, celery_config, tls_refusal

PG = "postgresql+psycopg://zw@db.internal:5432/zw"
REDISS = "rediss://cache.internal:6380/0"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ``ZW_*`` variable from the outer environment leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("ZW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture()
def pem(tmp_path: Path) -> dict[str, Path]:
    """Files standing in for a CA, a client certificate and its key (only their paths matter)."""
    files = {}
    for name in ("ca.pem", "client.pem", "client.key"):
        files[name] = tmp_path / name
        files[name].write_text("-----BEGIN CERTIFICATE-----\n...\n")
    return files


# -- settings ---------------------------------------------------------------------------------


def test_tls_settings_read_paths_from_env_and_hand_them_to_each_driver(
    monkeypatch: pytest.MonkeyPatch, pem: dict[str, Path]
) -> None:
    monkeypatch.setenv("ZW_BROKER_URL", REDISS)
    monkeypatch.setenv("ZW_BROKER_CA_FILE", str(pem["ca.pem"]))
    monkeypatch.setenv("ZW_BROKER_CERT_FILE", str(pem["client.pem"]))
    monkeypatch.setenv("ZW_BROKER_KEY_FILE", str(pem["client.key"]))
    monkeypatch.setenv("ZW_METADATA_URL", PG)
    monkeypatch.setenv("ZW_METADATA_CA_FILE", str(pem["ca.pem"]))
    monkeypatch.setenv("ZW_METADATA_CERT_FILE", str(pem["client.pem"]))
    monkeypatch.setenv("ZW_METADATA_KEY_FILE", str(pem["client.key"]))
    monkeypatch.setenv("ZW_S3_ENDPOINT_URL", "https://minio.internal:9000")
    monkeypatch.setenv("ZW_S3_CA_BUNDLE", str(pem["ca.pem"]))

    settings = load_settings()

    assert settings.broker_ssl_options() == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(pem["ca.pem"]),
        "ssl_certfile": str(pem["client.pem"]),
        "ssl_keyfile": str(pem["client.key"]),
    }
    assert settings.metadata_connect_args() == {
        "sslmode": "verify-full",
        "sslrootcert": str(pem["ca.pem"]),
        "sslcert": str(pem["client.pem"]),
        "sslkey": str(pem["client.key"]),
    }
    assert settings.s3_options()["ca_bundle"] == str(pem["ca.pem"])


def test_tls_settings_come_from_the_stack_file_too(tmp_path: Path, pem: dict[str, Path]) -> None:
    stack = tmp_path / "stack.toml"
    stack.write_text(
        f'[stack]\nmetadata_url = "{PG}"\nmetadata_sslmode = "verify-ca"\n'
        f'metadata_ca_file = "{pem["ca.pem"]}"\n'
    )

    settings = load_settings(stack)

    assert settings.metadata_connect_args() == {
        "sslmode": "verify-ca",
        "sslrootcert": str(pem["ca.pem"]),
    }


def test_tls_settings_without_tls_hand_nothing_to_the_drivers() -> None:
    settings = Settings(broker_url="redis://cache:6379/0", metadata_url=PG)

    assert settings.broker_ssl_options() == {}
    assert settings.metadata_connect_args() == {}
    assert settings.s3_options()["ca_bundle"] is None


def test_tls_settings_bare_rediss_still_verifies_against_the_system_cas() -> None:
    assert Settings(broker_url=REDISS).broker_ssl_options() == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_tls_settings_leave_ssl_query_parameters_to_the_url(pem: dict[str, Path]) -> None:
    url = f"{REDISS}?ssl_ca_certs={pem['ca.pem']}&ssl_cert_reqs=required"

    assert Settings(broker_url=url).broker_ssl_options() == {}
    assert "broker_use_ssl" not in celery_config(url)


def test_tls_settings_missing_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"ZW_BROKER_CA_FILE names .*not a file"):
        Settings(broker_url=REDISS, broker_ca_file=tmp_path / "nope.pem")


def test_tls_settings_refuse_inlined_pem_without_echoing_it() -> None:
    secret = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"

    with pytest.raises(ConfigurationError, match="ZW_METADATA_KEY_FILE holds PEM text") as info:
        Settings(metadata_url=PG, metadata_key_file=secret)  # type: ignore[arg-type]
    assert "MIGHAgEA" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"broker_url": "redis://cache:6379/0"}, "is not a rediss:// URL"),
        ({"broker_url": f"{REDISS}?ssl_cert_reqs=none"}, "either in the URL or in ZW_BROKER_"),
        ({"metadata_url": "sqlite:///m.db"}, "applies to PostgreSQL only"),
        ({"metadata_url": f"{PG}?sslrootcert=/etc/ca.pem"}, "sslrootcert in ZW_METADATA_URL"),
        (
            {"s3_endpoint_url": "http://minio:9000", "s3_ca_bundle": "CA"},
            "plain http://, so S3 traffic would not use TLS",
        ),
    ],
    ids=["plain-broker", "broker-twice", "sqlite", "metadata-twice", "plain-s3"],
)
def test_tls_settings_refuse_a_file_that_would_not_reach_its_link(
    pem: dict[str, Path], kwargs: dict[str, str], message: str
) -> None:
    kwargs = dict(kwargs)
    if "broker_url" in kwargs:
        kwargs["broker_ca_file"] = str(pem["ca.pem"])
    elif "metadata_url" in kwargs:
        kwargs["metadata_ca_file"] = str(pem["ca.pem"])
    else:
        kwargs["s3_ca_bundle"] = str(pem["ca.pem"])

    with pytest.raises(ConfigurationError, match=message):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_tls_settings_client_key_needs_its_certificate(pem: dict[str, Path]) -> None:
    with pytest.raises(ConfigurationError, match="ZW_BROKER_KEY_FILE is set without"):
        Settings(broker_url=REDISS, broker_key_file=pem["client.key"])
    with pytest.raises(ConfigurationError, match="go together"):
        Settings(metadata_url=PG, metadata_cert_file=pem["client.pem"])


def test_tls_settings_bad_sslmode_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZW_METADATA_URL", PG)
    monkeypatch.setenv("ZW_METADATA_SSLMODE", "verify")

    with pytest.raises(ConfigurationError, match="metadata_sslmode.*ZW_METADATA_SSLMODE"):
        load_settings()


# -- what reaches the drivers -------------------------------------------------------------------


def test_tls_celery_app_gets_the_broker_files(pem: dict[str, Path]) -> None:
    from zenml_workers.worker.celery_app import create_app

    settings = Settings(broker_url=REDISS, broker_ca_file=pem["ca.pem"])

    app = create_app(settings)

    assert app.conf.broker_use_ssl == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(pem["ca.pem"]),
    }


def test_tls_apps_with_other_tls_files_share_no_pooled_connection(tmp_path: Path) -> None:
    from zenml_workers.worker.celery_app import create_app

    cas = [tmp_path / "a.pem", tmp_path / "b.pem"]
    for ca in cas:
        ca.write_text("-----BEGIN CERTIFICATE-----\n")
    apps = [create_app(Settings(broker_url=REDISS, broker_ca_file=ca)) for ca in cas]
    again = create_app(Settings(broker_url=REDISS, broker_ca_file=cas[0]))

    # kombu.pools.connections is keyed by this hash, which leaves out broker_use_ssl.
    keys = [app.connection_for_write().__eqhash__() for app in (*apps, again)]
    assert keys[0] != keys[1]
    assert keys[0] == keys[2]


def test_tls_dead_letter_client_gets_the_broker_files(pem: dict[str, Path]) -> None:
    settings = Settings(broker_url=REDISS, broker_ca_file=pem["ca.pem"])

    dead = DeadLetterList.from_url(REDISS, settings.broker_ssl_options())

    kwargs = dead.client.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(pem["ca.pem"])
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED


class _Stop(Exception):
    """Ends a connection attempt before any network is used."""


def test_tls_metadata_store_passes_connect_args_to_the_engine(pem: dict[str, Path]) -> None:
    args = Settings(metadata_url=PG, metadata_ca_file=pem["ca.pem"]).metadata_connect_args()
    store = MetadataStore(PG, connect_args=args, migrate=False)

    seen: dict[str, object] = {}

    def record(_dialect: object, _record: object, _cargs: object, cparams: dict) -> None:
        seen.update(cparams)
        raise _Stop

    store._build_engine()
    assert store._engine is not None
    event.listen(store._engine, "do_connect", record)
    try:
        with pytest.raises(_Stop):
            store._engine.connect()
    finally:
        store.dispose()
    assert seen["sslmode"] == "verify-full"
    assert seen["sslrootcert"] == str(pem["ca.pem"])


def test_tls_s3_client_verifies_with_the_ca_bundle(pem: dict[str, Path]) -> None:
    store = artifact_store_from_uri(
        "s3://bucket/p",
        endpoint_url="https://minio.internal:9000",
        access_key_id="k",
        secret_access_key="s",
        ca_bundle=str(pem["ca.pem"]),
    )

    assert isinstance(store, S3ArtifactStore)
    assert store.client._endpoint.http_session._verify == str(pem["ca.pem"])  # type: ignore[attr-defined]


# -- TLS failures are not outages -----------------------------------------------------------------

_VERIFY_FAILED = ssl.SSLCertVerificationError(
    1,
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
    "certificate (_ssl.c:1006)",
)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ('connection to server at "10.0.0.5", port 5432 failed: SSL error: certificate verify failed', "untrusted"),
        ('root certificate file "/root/.postgresql/root.crt" does not exist\nEither provide the file', "untrusted"),
        ('server certificate for "db.internal" does not match host name "10.0.0.5"', "name"),
        ('FATAL:  pg_hba.conf rejects connection for host "10.0.0.9", user "zw", database "zw", no encryption', "plaintext-client"),
        ("FATAL:  connection requires a valid client certificate", "client-cert"),
        ("server does not support SSL, but SSL was required", "plaintext-server"),
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate is not valid for '10.0.0.5'. (_ssl.c:1006)", "name"),
        ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required (_ssl.c:2580)", "client-cert"),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", "plaintext-server"),
    ],
)  # fmt: skip
def test_tls_refusal_recognises_failures_no_retry_fixes(message: str, kind: str) -> None:
    found = tls.refusal(RuntimeError(message))

    assert found is not None and found.kind == kind
    assert "_ssl.c" not in found.reason


@pytest.mark.parametrize(
    "message",
    [
        "SSL SYSCALL error: EOF detected",
        "SSL connection has been closed unexpectedly",
        "EOF occurred in violation of protocol (_ssl.c:2427)",
        'connection to server at "10.0.0.5", port 5432 failed: Connection refused',
    ],
)
def test_tls_refusal_leaves_outages_alone(message: str) -> None:
    assert tls.refusal(RuntimeError(message)) is None


def test_tls_refusal_finds_the_ssl_error_redis_wrapped() -> None:
    try:
        try:
            raise _VERIFY_FAILED
        except ssl.SSLError:
            raise redis.ConnectionError("Error 1 connecting to 10.0.0.5:6380.") from None
    except redis.ConnectionError as e:
        wrapped: BaseException = e
    wrapped.__context__ = _VERIFY_FAILED

    sentence = tls_refusal(wrapped, "rediss://:pw@10.0.0.5:6380/0")

    assert sentence is not None
    assert sentence.startswith("the TLS connection to the broker (Redis) at rediss://:***@")
    assert "ZW_BROKER_CA_FILE" in sentence and "pw" not in sentence


def test_tls_metadata_store_certificate_failure_is_not_retried() -> None:
    store = MetadataStore(PG, migrate=False)
    error = exc.OperationalError(
        "SELECT 1",
        {},
        Exception(
            'connection failed: connection to server at "10.0.0.5", port 5432 failed: '
            "SSL error: certificate verify failed"
        ),
    )

    refused = store._unreachable(error)
    outage = store._unreachable(
        exc.OperationalError("SELECT 1", {}, Exception("Connection refused"))
    )

    assert type(refused) is MetadataStoreError
    assert str(refused) == (
        "the TLS connection to the metadata store (PostgreSQL) at "
        "postgresql+psycopg://zw@db.internal:5432/zw failed (SSL error: certificate verify "
        "failed); set ZW_METADATA_CA_FILE to the CA certificate (a PEM file) that signed the "
        "server's certificate, or renew a certificate that expired"
    )
    assert isinstance(outage, MetadataStoreUnavailableError)


def test_tls_s3_certificate_failure_is_not_retried() -> None:
    from botocore.exceptions import SSLError

    store = S3ArtifactStore("bucket", endpoint_url="https://minio.internal:9000")
    error = SSLError(endpoint_url="https://minio.internal:9000/bucket", error=_VERIFY_FAILED)
    eof = SSLError(
        endpoint_url="https://minio.internal:9000/bucket",
        error=ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)"),
    )

    refused = store.translate(error, "list", "s3://bucket")

    assert type(refused) is ArtifactStoreError
    assert not isinstance(refused, InfrastructureError)
    assert str(refused).startswith("The TLS connection to S3 at https://minio.internal:9000 failed")
    assert "ZW_S3_CA_BUNDLE" in str(refused)
    assert isinstance(store.translate(eof, "list", "s3://bucket"), ArtifactStoreUnavailableError)


def test_tls_dead_letters_say_tls_not_unreachable() -> None:
    class Refusing:
        def lrange(self, *_: object) -> list[bytes]:
            raise redis.ConnectionError(f"Error 1 connecting to 10.0.0.5:6380. {_VERIFY_FAILED}")

    dead = DeadLetterList(Refusing())

    with pytest.raises(ConfigurationError, match=r"broker \(Redis\) failed .*ZW_BROKER_CA_FILE"):
        dead.newest(5)


def test_tls_dead_letters_outage_stays_unavailable() -> None:
    class Down:
        def lrange(self, *_: object) -> list[bytes]:
            raise redis.ConnectionError(
                "Error 111 connecting to 10.0.0.5:6380. Connection refused."
            )

    with pytest.raises(BrokerUnavailableError):
        DeadLetterList(Down()).newest(5)
