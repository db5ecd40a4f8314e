"""Fixtures shared by the unit tests: no network, no services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stores.metadata.store import MetadataStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    """A fresh SQLite metadata store in the test's folder (a file: no server)."""
    st = MetadataStore(f"sqlite:///{tmp_path / 'metadata.db'}")
    try:
        yield st
    finally:
        st.dispose()
