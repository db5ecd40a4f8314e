"""A module a forged message may name as a materializer: importing it leaves a mark.

The trust test checks that no worker ever imports it (``$EVIL_MARKER`` stays absent).
"""

from __future__ import annotations

import os
from pathlib import Path

from zenml_workers.sdk.materializers.base import Materializer

_marker = os.environ.get("EVIL_MARKER")
if _marker:
    Path(_marker).write_text("imported")


class Evil(Materializer):
    """Would run anything on load; must never be chosen from a message."""
