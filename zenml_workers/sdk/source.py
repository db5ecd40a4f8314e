"""A step function's source text, source hash and pickled code blob.

The *source hash* identifies what a step does: sha256 of the function's source
without its decorator lines, so ``@step(retries=2)`` and ``@step`` agree while an
edited body does not. When the source cannot be read (a REPL), the hash covers
the code object's bytecode, constants and names instead.

The *code blob* is what a worker loads to run the step: the raw function,
pickled with cloudpickle. A function that lives at the top level of an
importable module is pickled *by reference* (module, qualified name and bytecode
hash), so workers import the same code the client used and refuse to run a
different version of it; anything else (``__main__``, functions defined inside
functions) is pickled by value, which cloudpickle does by itself.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import io
import sys
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zenml_workers.errors import ExecutionError

__all__ = ["CodeBlob", "bytecode_hash", "code_blob", "function_source", "source_hash"]

#: Prefix of hashes computed from source text.
SOURCE_PREFIX = "sha256:"
#: Prefix of hashes computed from bytecode, when no source text could be read.
BYTECODE_PREFIX = "sha256-code:"


@dataclass(frozen=True)
class CodeBlob:
    """A step's pickled entrypoint, keyed by ``code_hash`` (``"sha256:<hex>"`` of ``pickled``)."""

    code_hash: str
    name: str
    source: str
    pickled: bytes


def function_source(fn: Callable[..., Any]) -> str:
    """The dedented source of ``fn`` without decorator lines, or ``""`` when it cannot be read."""
    try:
        raw = inspect.getsource(fn)
    except (OSError, TypeError):
        return ""
    text = textwrap.dedent(raw)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        # A lambda's source is its whole line, which need not parse on its own.
        return text
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = text.splitlines(keepends=True)
            return "".join(lines[node.lineno - 1 :])
    return text


def _const_text(const: Any) -> str:
    """A stable text for a code constant (frozensets are unordered, so sort their items)."""
    if isinstance(const, frozenset):
        return "frozenset(" + ",".join(sorted(_const_text(c) for c in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ",".join(_const_text(c) for c in const) + ")"
    return repr(const)


def _hash_code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, h)
        else:
            h.update(_const_text(const).encode())


def bytecode_hash(fn: Callable[..., Any]) -> str:
    """``"sha256-code:<hex>"`` of ``fn``'s bytecode, names and constants, recursively.

    Equal for the same code under the same Python minor version, whatever the
    file path, line numbers or hash seed.
    """
    h = hashlib.sha256()
    code = getattr(fn, "__code__", None)
    if code is not None:
        _hash_code(code, h)
    else:
        h.update(repr(fn).encode())
    return BYTECODE_PREFIX + h.hexdigest()


def source_hash(fn: Callable[..., Any], source: str | None = None) -> str:
    """Hash of what ``fn`` does, stable across decorator arguments.

    Args:
        fn: the raw (undecorated) function.
        source: its text from :func:`function_source`, when already read.

    Returns:
        ``"sha256:<hex>"`` of the source text, or :func:`bytecode_hash` when no
        source is available.
    """
    text = function_source(fn) if source is None else source
    if text:
        return SOURCE_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return bytecode_hash(fn)


def _python_tag() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _reference_of(fn: Callable[..., Any]) -> tuple[str, str] | None:
    """``(module, qualname)`` when ``fn`` can be re-imported on a worker, else None."""
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if not module_name or module_name == "__main__" or "<" in qualname:
        return None
    try:
        target = _resolve(module_name, qualname)
    except (ImportError, AttributeError):
        return None
    if target is fn or getattr(target, "entrypoint", None) is fn:
        return module_name, qualname
    return None


def _resolve(module_name: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _load_entrypoint(
    module_name: str, qualname: str, expected_hash: str, python: str
) -> Callable[..., Any]:
    """Unpickling hook: import a step's raw function and check it is the code the client built.

    The bytecode check is skipped across Python minor versions, whose bytecode differs.

    Raises:
        ExecutionError: when the function cannot be imported here or its code differs.
    """
    try:
        target = _resolve(module_name, qualname)
    except (ImportError, AttributeError) as e:
        raise ExecutionError(
            f"cannot import step function {module_name}:{qualname} on this worker ({e}); "
            f"install or put on PYTHONPATH the same code the pipeline was submitted from"
        ) from e
    fn = getattr(target, "entrypoint", target)
    if python == _python_tag() and bytecode_hash(fn) != expected_hash:
        raise ExecutionError(
            f"step function {module_name}:{qualname} on this worker differs from the one the "
            f"pipeline was built with; deploy the same code to the workers and the client "
            f"(and restart workers after editing it)"
        )
    return fn  # type: ignore[no-any-return]


def _pickler_class() -> type:
    import cloudpickle

    class _EntrypointPickler(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO, root: Callable[..., Any]):
            super().__init__(file)
            self._root = root

        def reducer_override(self, obj: Any) -> Any:
            if obj is self._root:
                ref = _reference_of(obj)
                if ref is not None:
                    return _load_entrypoint, (*ref, bytecode_hash(obj), _python_tag())
            return super().reducer_override(obj)

    return _EntrypointPickler


def code_blob(fn: Callable[..., Any], name: str, source: str) -> CodeBlob:
    """Pickle a step's raw function into a :class:`CodeBlob`.

    A by-reference pickle embeds the function's :func:`bytecode_hash`, so the
    code hash changes whenever the code does and a worker whose copy differs
    refuses to load it.

    Args:
        fn: the raw function.
        name: the step name, for humans reading the store.
        source: its source text (see :func:`function_source`).
    """
    buf = io.BytesIO()
    _pickler_class()(buf, fn).dump(fn)
    pickled = buf.getvalue()
    return CodeBlob(
        code_hash=SOURCE_PREFIX + hashlib.sha256(pickled).hexdigest(),
        name=name,
        source=source,
        pickled=pickled,
    )
