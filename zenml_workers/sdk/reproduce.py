"""Resume, reproduce and compare runs: retry, rerun and diff."""

from __future__ import annotations


class ReproduceMixin:
    """``Client`` methods ``retry``, ``rerun`` and ``diff``."""
