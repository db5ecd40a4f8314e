"""``Client`` access to what stack components (experiment trackers, ...) recorded."""

from __future__ import annotations


class TrackingMixin:
    """``Client`` methods for what stack components recorded."""
