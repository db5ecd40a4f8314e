"""Shared stacks: stack records in the metadata store, registered, shared, exported and imported."""

from __future__ import annotations


class StacksMixin:
    """``Client`` methods for stack records (``list_stacks``, ``register_stack``, ...)."""
