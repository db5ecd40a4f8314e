"""Secrets never reach logs, run records, repr or ``zw stack``: redaction on every URL shape."""

from __future__ import annotations

import pytest

from stores.metadata.store import redact_url
from zenml_workers.settings import Settings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://zw:s3cr3t@db:5432/zw", "postgresql+psycopg://zw:***@db:5432/zw"),
        ("redis://:s3cr3t@broker:6379/0", "redis://:***@broker:6379/0"),
        ("rediss://default:s3cr3t@broker:6380/0", "rediss://default:***@broker:6380/0"),
        ("redis://u:p%40ss%3Aword@h/0", "redis://u:***@h/0"),
        ("redis://:a@b@h/0", "redis://:***@h/0"),
        (
            "postgresql://zw@db/zw?password=s3cr3t&sslmode=verify-full",
            "postgresql://zw@db/zw?password=***&sslmode=verify-full",
        ),
        ("postgresql://db/zw?sslpassword=s3cr3t", "postgresql://db/zw?sslpassword=***"),
        ("https://h/x?access_token=s3cr3t&page=2", "https://h/x?access_token=***&page=2"),
        ("https://h/x?api_key=s3cr3t", "https://h/x?api_key=***"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAXXXX&X-Amz-Signature=s3cr3t",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("amqp://guest:s3cr3t@[::1]:5672//", "amqp://guest:***@[::1]:5672//"),
        ("redis://broker:6379/0", "redis://broker:6379/0"),
        ("postgresql://zw@db/zw", "postgresql://zw@db/zw"),
        ("sqlite:////abs/path/metadata.db", "sqlite:////abs/path/metadata.db"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("/local/folder", "/local/folder"),
        ("", ""),
    ],
)
def test_redact_url_hides_every_secret_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cr3t" not in redact_url(url)


def test_settings_keep_secrets_out_of_repr_and_records() -> None:
    s = Settings(
        broker_url="redis://:brokerpw@h:6379/0",
        metadata_url="postgresql+psycopg://zw:dbpw@db/zw?password=qpw",
        s3_secret_access_key="s3pw",
        secret_key="signpw",
        previous_secret_keys="oldpw",
    )
    shown = " ".join(
        [
            repr(s),
            str(s),
            repr(s.describe()),
            s.model_dump_json(),
            repr(s.model_dump()),
            f"{s.broker_url} {s.metadata_url!r} {s.broker_url!s}",
        ]
    )
    for secret in ("brokerpw", "dbpw", "qpw", "s3pw", "signpw", "oldpw"):
        assert secret not in shown, secret
    assert "redis://:***@h:6379/0" in shown  # redacted, not blanked: the host stays readable
    # Still usable where a client connects, and only through an explicit call.
    assert s.s3_options()["secret_access_key"] == "s3pw"
    assert s.reveal_broker_url() == "redis://:brokerpw@h:6379/0"
    assert "dbpw" in s.resolved_metadata_url()


def test_url_settings_are_secret_types_so_an_fstring_cannot_leak_them() -> None:
    from pydantic import SecretStr

    s = Settings(broker_url="redis://:pw@h/0", metadata_url="postgresql://u:pw@db/zw")
    assert isinstance(s.broker_url, SecretStr) and isinstance(s.metadata_url, SecretStr)
    assert not hasattr(s.broker_url, "startswith")  # no str method to misuse it through
    assert Settings().is_embedded and Settings().reveal_broker_url() == ""
    assert Settings(broker_url="").is_embedded


def test_a_model_copy_with_plain_strings_still_hides_them() -> None:
    # model_copy(update=...) skips validation, so the fields hold plain str.
    s = Settings().model_copy(
        update={"broker_url": "redis://:pw1@h/0", "s3_secret_access_key": "pw2"}
    )
    shown = repr(s) + s.model_dump_json()
    assert "pw1" not in shown and "pw2" not in shown
    assert s.reveal_broker_url() == "redis://:pw1@h/0" and not s.is_embedded


def test_settings_identity_changes_with_a_url_password() -> None:
    a = Settings(metadata_url="postgresql://u:one@db/zw")
    b = Settings(metadata_url="postgresql://u:two@db/zw")
    assert a.identity() != b.identity()
