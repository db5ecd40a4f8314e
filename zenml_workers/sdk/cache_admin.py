"""Managing the shared cache: listing, clearing and garbage-collecting cached step outputs."""

from __future__ import annotations


class CacheMixin:
    """``Client`` methods for the cache (``list_cache``, ``clear_cache``, ``gc``)."""
