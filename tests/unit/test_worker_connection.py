"""The broker URL our Celery apps show (banner, "Connected to" line, Flower): no connection made."""

from __future__ import annotations

import pytest

from zenml_workers.settings import Settings
from zenml_workers.worker.celery_app import create_app

KEY = "unit-test-signing-key-not-a-secret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://alice@127.0.0.1:6379/0", "redis://alice@127.0.0.1:6379/0"),
        ("redis://:s3cret-pw@127.0.0.1:6379/0", "redis://:**@127.0.0.1:6379/0"),
        ("redis://alice:s3cret-pw@127.0.0.1:6379/0", "redis://alice:**@127.0.0.1:6379/0"),
        ("rediss://:s3cret-pw@redis.internal:6380/0", "rediss://:**@redis.internal:6380/0"),
    ],
)
def test_app_connection_uri_masks_only_a_password_that_exists(url: str, shown: str) -> None:
    app = create_app(Settings(broker_url=url, secret_key=KEY))

    assert app.connection().as_uri() == shown
    assert app.connection_for_read().as_uri() == shown
    assert "s3cret-pw" not in shown
