"""Fixtures for runs on the embedded default: a fresh stack in a temporary ``ZW_HOME``.

Import the fixture into a test module (``from tests.pipelines.fixtures import
local_stack``); nothing here is autouse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from zenml_workers.settings import Settings, load_settings

#: Variables that would point the embedded default at some other stack.
_FOREIGN_STACK_VARIABLES = (
    "ZW_BROKER_URL",
    "ZW_METADATA_URL",
    "ZW_ARTIFACT_URI",
    "ZW_STACK_FILE",
    "ZW_QUEUES",
)


@pytest.fixture
def local_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The embedded default (2 local worker processes, SQLite, a local folder) under ``tmp_path``.

    Yields the settings a plain ``load_settings()`` now returns; on teardown every
    stack this process opened is closed, so pools and engines do not leak.
    """
    from zenml_workers.sdk.stack import close_stacks

    home = tmp_path / "zw-home"
    monkeypatch.setenv("ZW_HOME", str(home))
    for name in _FOREIGN_STACK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZW_LOCAL_WORKERS", "2")
    settings = load_settings()
    assert settings.is_embedded
    try:
        yield settings
    finally:
        close_stacks()


def artifact_files(settings: Settings) -> list[Path]:
    """Every file under the stack's local artifact folder (temporary files included)."""
    root = Path(settings.resolved_artifact_uri())
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def file_sha256(uri: str) -> str:
    """``sha256:<hex>`` of the bytes of a local artifact, read straight from disk.

    Raises:
        AssertionError: ``uri`` is not a local file URI or absolute path.
    """
    from stores.artifacts.local import LocalArtifactStore

    path = LocalArtifactStore("/").path_for(uri)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
