"""Which names pipelines, steps and outputs may have, checked when they are defined.

Step invocation ids and output names become artifact keys
(``<run id>/<invocation id>.<attempt>.<output>``) and then URIs, so a name holding
``#`` or ``?`` would be cut short when its ``s3://`` or ``memory://`` URI is parsed
(``v#x`` used to load output ``v``), and one holding ``/`` or ``..`` would nest
elsewhere. Rather than escaping, names are restricted, as ZenML does, to ASCII letters,
digits, ``_``, ``-`` and ``.``, not starting with ``.`` and without ``..``; keys stay
readable and every allowed name round-trips unchanged on every store. Step names and
invocation ids may not hold ``.`` either: the key joins them to the attempt and the
output name with dots, so ``a`` + ``1.x`` and ``a.1`` + ``x`` would be the same key.
Non-ASCII letters (``modèle``) are refused too, so the keys are the same bytes in
every store, URI and shell.
"""

from __future__ import annotations

import string

__all__ = ["MAX_NAME_LENGTH", "name_problem"]

#: Longest name, in characters: room for ``_<n>`` suffixes within the 255-character columns.
MAX_NAME_LENGTH = 200

_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")
_STEP_CHARS = _NAME_CHARS - {"."}


def name_problem(name: object, *, dots: bool = True) -> str | None:
    """Say what is wrong with ``name``, or return None when it is a valid name.

    Args:
        name: The candidate (anything: a non-string is a problem too).
        dots: Whether ``.`` is allowed (pipeline and output names; not step names or ids).

    Returns:
        A clause for an error message, naming the bad character and the allowed set.
    """
    allowed = (
        "use ASCII letters, digits, '_', '-' and '.' (not first, and no '..')"
        if dots
        else "use ASCII letters, digits, '_' and '-'"
    )
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}; {allowed}"
    if not name:
        return f"must not be empty; {allowed}"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters long, over the limit of {MAX_NAME_LENGTH}; shorten it"
    chars = _NAME_CHARS if dots else _STEP_CHARS
    for ch in name:
        if ch not in chars:
            shown = (
                repr(ch) if ch.isprintable() and not ch.isspace() else f"{ch!r} (U+{ord(ch):04X})"
            )
            return f"has {shown}, which names cannot contain; {allowed}"
    if name.startswith("."):
        return f"must not start with '.'; {allowed}"
    if ".." in name:
        return f"must not contain '..'; {allowed}"
    return None
