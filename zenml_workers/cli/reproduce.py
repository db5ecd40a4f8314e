"""`zw` commands for reproduce."""

from __future__ import annotations
