"""A step function's source text, source hash and pickled code blob.

The *source hash* identifies what a step does: sha256 of the function's source
without its decorator lines, so ``@step(retries=2)`` and ``@step`` agree while an
edited body does not. When the source cannot be read (a REPL), the hash covers
the code object's bytecode, constants and names instead.

The *code blob* is what a worker loads to run the step: the raw function,
pickled with cloudpickle. A function that lives at the top level of an
importable module is pickled *by reference* (module, qualified name and source
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
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zenml_workers.errors import ExecutionError

__all__ = ["CodeBlob", "code_blob", "function_source", "source_hash"]

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


def _hash_code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    h.update(repr(code.co_varnames).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, h)
        else:
            h.update(repr(const).encode())


def source_hash(fn: Callable[..., Any], source: str | None = None) -> str:
    """Hash of what ``fn`` does, stable across decorator arguments.

    Args:
        fn: the raw (undecorated) function.
        source: its text from :func:`function_source`, when already read.

    Returns:
        ``"sha256:<hex>"`` of the source text, or ``"sha256-code:<hex>"`` of the
        bytecode when no source is available.
    """
    text = function_source(fn) if source is None else source
    if text:
        return SOURCE_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()
    h = hashlib.sha256()
    code = getattr(fn, "__code__", None)
    if code is not None:
        _hash_code(code, h)
    else:
        h.update(repr(fn).encode())
    return BYTECODE_PREFIX + h.hexdigest()


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


def _load_entrypoint(module_name: str, qualname: str, expected_hash: str) -> Callable[..., Any]:
    """Unpickling hook: import a step's raw function and check it is the code the client built.

    Raises:
        ExecutionError: when the module cannot be imported here or its source differs.
    """
    try:
        target = _resolve(module_name, qualname)
    except (ImportError, AttributeError) as e:
        raise ExecutionError(
            f"cannot import step function {module_name}:{qualname} on this worker ({e}); "
            f"install or put on PYTHONPATH the same code the pipeline was submitted from"
        ) from e
    fn = getattr(target, "entrypoint", target)
    found = source_hash(fn)
    same_kind = found.split(":", 1)[0] == expected_hash.split(":", 1)[0]
    if same_kind and found != expected_hash:
        raise ExecutionError(
            f"step function {module_name}:{qualname} on this worker differs from the one the "
            f"pipeline was built with; deploy the same code to the workers and the client"
        )
    return fn  # type: ignore[no-any-return]


def _pickler_class() -> type:
    import cloudpickle

    class _EntrypointPickler(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO, root: Callable[..., Any], hash_: str):
            super().__init__(file)
            self._root = root
            self._hash = hash_

        def reducer_override(self, obj: Any) -> Any:
            if obj is self._root:
                ref = _reference_of(obj)
                if ref is not None:
                    return _load_entrypoint, (ref[0], ref[1], self._hash)
            return super().reducer_override(obj)

    return _EntrypointPickler


def code_blob(fn: Callable[..., Any], name: str, source: str, hash_: str) -> CodeBlob:
    """Pickle a step's raw function into a :class:`CodeBlob`.

    Args:
        fn: the raw function.
        name: the step name, for humans reading the store.
        source: its source text (see :func:`function_source`).
        hash_: its source hash, embedded in by-reference pickles and checked on load.
    """
    buf = io.BytesIO()
    _pickler_class()(buf, fn, hash_).dump(fn)
    pickled = buf.getvalue()
    return CodeBlob(
        code_hash=SOURCE_PREFIX + hashlib.sha256(pickled).hexdigest(),
        name=name,
        source=source,
        pickled=pickled,
    )
