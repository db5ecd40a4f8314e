"""Checking values and upstream outputs against step annotations at build time.

Only plain classes and simple generics are judged; anything looser (``Any``,
unresolved strings, complex generics) passes, so a check never refuses a
pipeline that would have worked.
"""

from __future__ import annotations

import inspect
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

__all__ = ["admits_none", "describe_type", "types_compatible", "value_matches"]


def describe_type(tp: Any) -> str:
    """A short human name for an annotation: ``int``, ``list[int]``, ``Optional[Model]``."""
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _strip(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _all_match(results: list[bool | None]) -> bool | None:
    if any(r is False for r in results):
        return False
    return None if any(r is None for r in results) else True


def value_matches(value: Any, annotation: Any) -> bool | None:
    """Whether a JSON-able ``value`` fits a simple ``annotation``.

    Returns:
        True or False for simple annotations (int, float, str, bool, list, dict,
        Optional/Union of those, Literal; an int fits float, a bool fits no int),
        None when the annotation is too complex to judge.
    """
    tp = _strip(annotation)
    if tp is Any or tp is object or tp is inspect.Parameter.empty:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(tp))
    if _is_union(tp):
        results = [value_matches(value, a) for a in get_args(tp)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            return False
        args = get_args(tp)
        return _all_match([value_matches(v, args[0]) for v in value]) if args else True
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        args = get_args(tp)
        return _all_match([value_matches(v, args[1]) for v in value.values()]) if args else True
    return None


def admits_none(annotation: Any) -> bool:
    """Whether None is a sensible value for ``annotation`` (Any, object, Optional[...])."""
    tp = _strip(annotation)
    if tp in (Any, object, None, type(None), inspect.Parameter.empty) or isinstance(tp, str):
        return True
    return _is_union(tp) and any(admits_none(a) for a in get_args(tp))


def _plain_class(tp: Any) -> bool:
    return (
        isinstance(tp, type)
        and tp is not object
        and get_origin(tp) is None
        and not isinstance(tp, types.GenericAlias)
        and not getattr(tp, "_is_protocol", False)
        and tp.__module__ != "typing"
    )


def types_compatible(produced: Any, expected: Any) -> bool:
    """False only when both are plain classes and neither is a subclass of the other.

    An ``int`` output fits a ``float`` input, as for parameters. Unions on the
    input side fit when any member fits; anything generic or unknown fits.
    """
    produced, expected = _strip(produced), _strip(expected)
    if _is_union(expected):
        return any(types_compatible(produced, a) for a in get_args(expected))
    if not (_plain_class(produced) and _plain_class(expected)):
        return True
    if produced is int and expected is float:
        return True
    try:
        return issubclass(produced, expected) or issubclass(expected, produced)
    except TypeError:
        return True
