"""`zw` commands for cache."""

from __future__ import annotations
