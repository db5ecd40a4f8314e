"""`zw` commands for stacks."""

from __future__ import annotations
