"""Materializers for Python's built-in values: JSON for plain data, raw bytes for ``bytes``."""

from __future__ import annotations

import json
from typing import Any, BinaryIO, ClassVar

from zenml_workers.errors import MaterializerError
from zenml_workers.sdk.materializers.base import Materializer, read_all

__all__ = ["BytesMaterializer", "JsonMaterializer"]

#: Key of the one-entry object that stands for a tuple in the JSON text.
TUPLE_TAG = "__zw_tuple__"

_SCALARS = (int, float, str, bool, type(None))


class JsonMaterializer(Materializer):
    """Saves plain data (numbers, strings, ``None`` and lists, dicts, tuples of them) as JSON.

    Tuples are written as ``{"__zw_tuple__": [...]}`` and come back as tuples.
    Only exact built-in types qualify, and dict keys must be strings, so what
    comes back equals what went in; anything else (a ``dict`` of tensors, a
    ``str`` subclass, an int-keyed dict) is refused by :meth:`can_save` and the
    registry looks further. NaN and infinities round-trip (Python's JSON dialect).
    """

    handles: ClassVar[tuple[str, ...]] = (
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.bool",
        "builtins.NoneType",
        "builtins.list",
        "builtins.dict",
        "builtins.tuple",
    )
    safe: ClassVar[bool] = True

    def can_save(self, value: Any) -> bool:
        return _is_plain(value, depth=0)

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Write ``value`` as UTF-8 JSON.

        Raises:
            MaterializerError: ``value`` holds something JSON cannot carry.
        """
        if not self.can_save(value):
            raise MaterializerError(
                f"JsonMaterializer cannot save a {type(value).__name__} holding non-JSON values; "
                "let the registry pick a materializer for it or register one."
            )
        text = json.dumps(_encode(value), ensure_ascii=False, separators=(",", ":"))
        fp.write(text.encode("utf-8"))
        metadata: dict[str, Any] = {"json_type": type(value).__name__}
        if isinstance(value, (list, tuple, dict)):
            metadata["length"] = len(value)
        return metadata

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Read the JSON text back, turning tagged objects into tuples.

        Raises:
            MaterializerError: The stream is not valid UTF-8 JSON.
        """
        try:
            return _decode(json.loads(read_all(fp).decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MaterializerError(
                f"The artifact is not valid JSON ({e}); it was written by another materializer "
                "or is corrupt, so load it with the materializer recorded for it."
            ) from e


class BytesMaterializer(Materializer):
    """Saves ``bytes`` as themselves, with no framing."""

    handles: ClassVar[tuple[str, ...]] = ("builtins.bytes",)
    safe: ClassVar[bool] = True

    def can_save(self, value: Any) -> bool:
        return type(value) is bytes

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        fp.write(value)
        return {"size_bytes": len(value)}

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        return read_all(fp)


#: Nesting deeper than this is refused (json would hit the recursion limit).
_MAX_DEPTH = 500


def _is_plain(value: Any, depth: int) -> bool:
    if depth > _MAX_DEPTH:
        return False
    tp = type(value)
    if tp in _SCALARS:
        return True
    if tp is list or tp is tuple:
        return all(_is_plain(v, depth + 1) for v in value)
    if tp is dict:
        return TUPLE_TAG not in value and all(
            type(k) is str and _is_plain(v, depth + 1) for k, v in value.items()
        )
    return False


def _encode(value: Any) -> Any:
    tp = type(value)
    if tp is tuple:
        return {TUPLE_TAG: [_encode(v) for v in value]}
    if tp is list:
        return [_encode(v) for v in value]
    if tp is dict:
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and TUPLE_TAG in value:
            return tuple(_decode(v) for v in value[TUPLE_TAG])
        return {k: _decode(v) for k, v in value.items()}
    return value
