"""Which materializer saves which value, and turning materializers and types into paths and back.

Lookups are by ``module.Qualname`` strings, so registering materializers for
optional libraries (numpy, pandas, torch) imports none of them. The tables are
plain module-level data: users extend them with :func:`register_materializer`
and :func:`register_value_materializer`, and a later registration wins.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
import typing
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from zenml_workers.errors import MaterializerError
from zenml_workers.sdk.materializers.base import Materializer, type_name
from zenml_workers.sdk.materializers.builtins import BytesMaterializer, JsonMaterializer
from zenml_workers.sdk.materializers.numpy import NumpyMaterializer
from zenml_workers.sdk.materializers.pandas import DataFrameMaterializer, SeriesMaterializer
from zenml_workers.sdk.materializers.pickle import CloudpickleMaterializer
from zenml_workers.sdk.materializers.torch import (
    TorchModuleMaterializer,
    TorchStateDictMaterializer,
    TorchTensorMaterializer,
)

__all__ = [
    "FALLBACK_MATERIALIZER",
    "load_materializer",
    "materializer_for_type",
    "materializer_for_value",
    "materializer_path",
    "register_materializer",
    "register_value_materializer",
    "resolve_type",
    "type_path",
]

logger = logging.getLogger("zenml_workers.materializers")

#: Used, with a warning, when nothing else can save a value.
FALLBACK_MATERIALIZER: type[Materializer] = CloudpickleMaterializer

#: ``module.Qualname`` of a type -> the materializer for it and its subclasses.
_BY_TYPE: dict[str, type[Materializer]] = {}
#: Materializers asked ``can_save(value)``, newest first, when no type lookup fits
#: (a ``dict`` of tensors is still a ``dict``).
_BY_VALUE: list[type[Materializer]] = []
#: ``module:Qualname`` -> materializer class, for :func:`load_materializer`.
_LOADED: dict[str, type[Materializer]] = {}

_DEFAULTS: tuple[type[Materializer], ...] = (
    JsonMaterializer,
    BytesMaterializer,
    NumpyMaterializer,
    DataFrameMaterializer,
    SeriesMaterializer,
    TorchTensorMaterializer,
    TorchModuleMaterializer,
)
_DEFAULT_VALUE_MATERIALIZERS: tuple[type[Materializer], ...] = (TorchStateDictMaterializer,)


def _check_materializer(materializer: Any) -> None:
    if not (isinstance(materializer, type) and issubclass(materializer, Materializer)):
        raise MaterializerError(
            f"{materializer!r} is not a Materializer subclass; pass a class that derives "
            "from zenml_workers.sdk.materializers.Materializer."
        )


def register_materializer(data_type: type | str, materializer: type[Materializer]) -> None:
    """Use ``materializer`` for values of ``data_type`` and its subclasses.

    ``data_type`` is a class or its ``module.Qualname`` (so a library need not be
    imported to register it). A later registration for the same type wins.

    Raises:
        MaterializerError: ``materializer`` is not a Materializer subclass.
    """
    _check_materializer(materializer)
    key = data_type.replace(":", ".") if isinstance(data_type, str) else type_name(data_type)
    _BY_TYPE[key] = materializer


def register_value_materializer(materializer: type[Materializer]) -> None:
    """Ask ``materializer.can_save(value)`` for values no type lookup could place.

    For containers whose type says too little (a ``dict`` of tensors). These are
    consulted newest first, before the pickle fallback.

    Raises:
        MaterializerError: ``materializer`` is not a Materializer subclass.
    """
    _check_materializer(materializer)
    if materializer in _BY_VALUE:
        _BY_VALUE.remove(materializer)
    _BY_VALUE.insert(0, materializer)


def _unwrap(tp: Any) -> type | None:
    """Reduce an annotation to the class it names, or ``None`` when only the value can tell."""
    for _ in range(32):  # nesting bound; real annotations unwrap in a few steps
        if tp is None or tp is type(None) or tp is Any or tp is inspect.Parameter.empty:
            return None
        if isinstance(tp, (str, TypeVar, typing.ForwardRef)):
            return None
        supertype = getattr(tp, "__supertype__", None)  # typing.NewType
        if supertype is not None:
            tp = supertype
            continue
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or origin is types.UnionType:
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return None
            tp = args[0]
        elif origin is not None:
            tp = origin  # list[int] -> list, dict[str, Tensor] -> dict
        else:
            return tp if isinstance(tp, type) else None
    return None


def materializer_for_type(tp: Any) -> type[Materializer] | None:
    """Pick the materializer for an annotation when the pipeline is built.

    Unwraps ``Annotated`` and ``Optional``; generic aliases use their origin
    (``list[int]`` -> ``list``); then walks the class's MRO, so subclasses of a
    registered type use its materializer.

    Returns:
        The materializer, or ``None`` when the annotation is missing or too loose
        (``Any``, ``None``, a union) and the value's type must decide at run time.
    """
    cls = _unwrap(tp)
    if cls is None:
        return None
    for klass in cls.__mro__:
        found = _BY_TYPE.get(type_name(klass))
        if found is not None:
            return found
    return None


def materializer_for_value(
    value: Any, declared: type[Materializer] | None = None
) -> type[Materializer]:
    """Pick the materializer that saves ``value``.

    In order: ``declared`` (from the annotation) if it can save the value; the
    first materializer registered along ``type(value).__mro__`` that can; the
    value materializers (:func:`register_value_materializer`); else cloudpickle,
    with a warning on the ``zenml_workers.materializers`` logger.
    """
    if declared is not None and declared().can_save(value):
        return declared
    for klass in type(value).__mro__:
        found = _BY_TYPE.get(type_name(klass))
        if found is not None and found is not declared and found().can_save(value):
            return found
    for candidate in _BY_VALUE:
        if candidate is not declared and candidate().can_save(value):
            return candidate
    name = type_name(type(value))
    logger.warning(
        "No materializer can save a value of type %s, so it is saved with cloudpickle, "
        "which runs code when loaded and may not load under other library versions; "
        "register one with zenml_workers.sdk.materializers.register_materializer(%s, "
        "YourMaterializer).",
        name,
        type(value).__qualname__,
    )
    return FALLBACK_MATERIALIZER


def materializer_path(cls: type[Materializer]) -> str:
    """Return ``module:Qualname`` for a materializer class, as recorded in specs."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_path(path: str) -> Any:
    """Import ``module:Qualname`` and return the object (raises ImportError/AttributeError)."""
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


#: Modules whose materializers a worker loads by name from a step message or an artifact row.
ALLOWED_MODULES = ("zenml_workers.sdk.materializers",)


def materializer_allowed(path: str, extra_modules: tuple[str, ...] = ()) -> bool:
    """Whether ``path`` (``module:Qualname``) names a registered materializer or one in an
    allowed module (ours, or one of ``extra_modules``: ``ZW_MATERIALIZER_MODULES``).

    Loading a materializer imports its module; a name taken from a message or a database row
    must not pick an arbitrary module (or a pickle-based class from one) to import.
    """
    module = path.partition(":")[0]
    if any(module == m or module.startswith(m + ".") for m in (*ALLOWED_MODULES, *extra_modules)):
        return True  # the common case first (every built-in): no walk over the registry
    return path in {materializer_path(m) for m in (*_BY_TYPE.values(), *_BY_VALUE)}


def load_materializer(path: str) -> type[Materializer]:
    """Import the materializer class named by ``module:Qualname`` (cached).

    Raises:
        MaterializerError: The path is malformed, cannot be imported here, or
            does not name a Materializer subclass.
    """
    cached = _LOADED.get(path)
    if cached is not None:
        return cached
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise MaterializerError(
            f"Materializer path {path!r} is not of the form 'module:Qualname'; "
            "record it with materializer_path()."
        )
    if "<locals>" in qualname:
        raise MaterializerError(
            f"Materializer {path!r} is defined inside a function and cannot be imported; "
            "define it at module level."
        )
    try:
        obj = _import_path(path)
    except ImportError as e:
        raise MaterializerError(
            f"Cannot import materializer {path!r} ({e}); install the package that "
            "defines it on this machine."
        ) from e
    except AttributeError as e:
        raise MaterializerError(
            f"Module {module_name!r} has no materializer {qualname!r}; check that this "
            "machine runs the same code version as the one that built the pipeline."
        ) from e
    _check_materializer(obj)
    _LOADED[path] = obj
    return obj  # type: ignore[no-any-return]


def type_path(tp: Any) -> str:
    """Return ``module:Qualname`` recording a type (or annotation) in specs and metadata.

    Annotations are unwrapped like in :func:`materializer_for_type`; one that
    names no class (``Any``, a union) is recorded as ``typing:Any``.
    """
    cls = tp if isinstance(tp, type) and tp is not Any and get_origin(tp) is None else _unwrap(tp)
    if cls is None:
        return "typing:Any"
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_type(path: str) -> type | None:
    """Import the class recorded by :func:`type_path`, or return ``None`` if this process cannot."""
    if path == "builtins:NoneType":
        return type(None)
    if ":" not in path or "<locals>" in path:
        return None
    try:
        obj = _import_path(path)
    except Exception:  # best effort: importing user code may raise anything
        return None
    # typing.Any is a class since Python 3.11, but it records "decided at run time".
    return obj if isinstance(obj, type) and obj is not Any else None


for _cls in _DEFAULTS:
    for _name in _cls.handles:
        _BY_TYPE[_name] = _cls
for _cls in reversed(_DEFAULT_VALUE_MATERIALIZERS):
    register_value_materializer(_cls)
del _cls, _name
