"""Periods as people write them: ``30m``, ``12h``, ``7d`` (s, m, h, d, w), a ``timedelta`` or
seconds. Standard library only, so a step decorator can read one without a database driver."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_PERIOD = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.IGNORECASE)


def parse_period(text: str) -> float:
    """Seconds in a period such as ``30m``, ``12h``, ``7d`` (also ``s`` and ``w``).

    Raises:
        ValueError: ``text`` is not a positive number followed by one unit.
    """
    m = _PERIOD.fullmatch(text)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(
            f"usage period {text!r} is not understood; give a number and a unit, "
            "e.g. 30m, 12h or 7d (s, m, h, d, w)"
        )
    return float(m.group(1)) * _UNITS_S[m.group(2).lower()]


def seconds_in(value: object) -> float | None:
    """Seconds in ``value`` (text as :func:`parse_period` reads it, ``"0"``/``"0s"``, a
    ``timedelta`` or a number), or None when it is none of these; may be zero or negative for
    a number or a ``timedelta``: the caller says what it allows."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if value.strip() in ("0", "0s"):
            return 0.0
        try:
            return parse_period(value)
        except ValueError:
            return None
    return None
