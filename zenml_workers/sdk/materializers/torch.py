"""PyTorch tensors, state dicts and modules, with weights stored as safetensors.

safetensors only reads and writes whole files, so each save goes through a
temporary file that is then streamed to the artifact writer (and each load
streams the artifact into a temporary file first): the weights are held in
memory once, never twice. Everything loads onto the CPU; move it afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import tempfile
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from zenml_workers.errors import MaterializerError
from zenml_workers.sdk.materializers.base import (
    Materializer,
    copy_stream,
    read_exactly,
    type_name,
)

if TYPE_CHECKING:
    import torch

__all__ = ["TorchModuleMaterializer", "TorchStateDictMaterializer", "TorchTensorMaterializer"]

#: Key of our JSON entry in the safetensors header's ``__metadata__``.
_META_KEY = "zenml_workers"
#: First bytes of a module artifact: magic, then the pickle's length (uint64, little-endian).
_MODULE_MAGIC = b"ZWTMOD1\n"


def _storable(value: Any) -> bool:
    """Whether safetensors can hold ``value``: a dense, real tensor (plain or Parameter)."""
    import torch

    return (
        type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.layout == torch.strided
        and not value.is_quantized
        and value.device.type != "meta"
    )


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU and make contiguous; copy tensors that share memory with an earlier one.

    safetensors refuses shared storage (tied weights, views of one buffer); the
    copies come back untied, which ``load_state_dict`` does not mind.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], fp: BinaryIO, info: dict[str, Any]) -> int:
    """Write ``tensors`` as one safetensors file to ``fp``; return its size in bytes.

    Raises:
        MaterializerError: safetensors refuses a tensor.
    """
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="zw-safetensors-") as tmp:
        path = os.path.join(tmp, "tensors.safetensors")
        try:
            save_file(_prepare(tensors), path, metadata={_META_KEY: json.dumps(info)})
        except (ValueError, RuntimeError, TypeError) as e:
            raise MaterializerError(
                f"safetensors cannot store these tensors ({e}); make them dense CPU/GPU "
                "tensors or save the value with CloudpickleMaterializer."
            ) from e
        with open(path, "rb") as f:
            return copy_stream(f, fp)


def _load_tensors(fp: BinaryIO) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors stream to its end; return the CPU tensors and our metadata entry.

    Raises:
        MaterializerError: The stream is not a valid safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    with tempfile.TemporaryDirectory(prefix="zw-safetensors-") as tmp:
        path = os.path.join(tmp, "tensors.safetensors")
        with open(path, "wb") as f:
            copy_stream(fp, f)
        try:
            with safe_open(path, framework="pt") as st:
                info = json.loads((st.metadata() or {}).get(_META_KEY, "{}"))
                tensors = {key: st.get_tensor(key) for key in st.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise MaterializerError(
                f"The artifact is not a readable safetensors file ({e}); it is corrupt, "
                "truncated or was written by another materializer."
            ) from e
    return tensors, info


class TorchTensorMaterializer(Materializer):
    """Saves one dense ``torch.Tensor`` (or ``nn.Parameter``) as a safetensors file.

    Gradients and the device are not kept; a Parameter comes back as a Parameter
    when the recorded type says so. Sparse, quantized and meta tensors are refused.
    """

    handles: ClassVar[tuple[str, ...]] = ("torch.Tensor",)
    safe: ClassVar[bool] = True

    def can_save(self, value: Any) -> bool:
        return _storable(value)

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Write the tensor.

        Raises:
            MaterializerError: safetensors refuses it.
        """
        size = _save_tensors({"tensor": value}, fp, {"kind": "tensor"})
        return {
            "shape": list(value.shape),
            "dtype": str(value.dtype),
            "device": str(value.device),
            "size_bytes": size,
        }

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Read the tensor onto the CPU.

        Raises:
            MaterializerError: The stream is not a tensor artifact.
        """
        import torch

        tensors, info = _load_tensors(fp)
        if info.get("kind") != "tensor" or "tensor" not in tensors:
            raise MaterializerError(
                "The safetensors artifact does not hold a single tensor; "
                "load it with TorchStateDictMaterializer."
            )
        tensor = tensors["tensor"]
        if isinstance(data_type, type) and issubclass(data_type, torch.nn.Parameter):
            return torch.nn.Parameter(tensor)
        return tensor


class TorchStateDictMaterializer(Materializer):
    """Saves a ``dict`` of string keys to dense tensors (a state dict) as safetensors.

    It handles no type by name: the registry consults it by value, so a step
    annotated ``dict`` or ``dict[str, Tensor]`` that returns tensors gets it after
    the JSON materializer declines. Key order and ``OrderedDict`` come back;
    tensors that shared memory (tied weights) come back as separate copies.
    """

    handles: ClassVar[tuple[str, ...]] = ()
    safe: ClassVar[bool] = True

    def can_save(self, value: Any) -> bool:
        # A dict cannot hold tensors unless torch was imported; don't import it to find out.
        if "torch" not in sys.modules or not isinstance(value, dict) or not value:
            return False
        return all(type(k) is str and _storable(v) for k, v in value.items())

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Write all tensors into one safetensors file, with the key order in its metadata.

        Raises:
            MaterializerError: safetensors refuses a tensor.
        """
        keys = list(value)
        size = _save_tensors(dict(value), fp, {"kind": "state_dict", "keys": keys})
        return {
            "tensors": len(keys),
            "parameters": int(sum(t.numel() for t in value.values())),
            "dtypes": sorted({str(t.dtype) for t in value.values()}),
            "size_bytes": size,
        }

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Read the tensors onto the CPU, in the order they were saved.

        Raises:
            MaterializerError: The stream is not a state-dict artifact.
        """
        tensors, info = _load_tensors(fp)
        if info.get("kind") != "state_dict":
            raise MaterializerError(
                "The safetensors artifact does not hold a state dict; "
                "load it with TorchTensorMaterializer."
            )
        items = [(k, tensors[k]) for k in info.get("keys", list(tensors))]
        if isinstance(data_type, type) and issubclass(data_type, OrderedDict):
            return OrderedDict(items)
        return dict(items)


class TorchModuleMaterializer(Materializer):
    """Saves a ``torch.nn.Module``: its tensors as safetensors, its structure with cloudpickle.

    The artifact is ``ZWTMOD1\\n``, the pickle's length (8 bytes, little-endian),
    the pickled module with every tensor replaced by a reference, then a
    safetensors file with the tensors. Classes importable by the loader are
    pickled by reference; classes defined in ``__main__`` by value. Tied
    parameters stay tied. The module comes back on the CPU.

    Loading runs pickle, which can execute arbitrary code from the artifact:
    only load modules from stores you trust (``safe`` is False). To exchange
    weights safely, save ``module.state_dict()`` instead.
    """

    handles: ClassVar[tuple[str, ...]] = ("torch.nn.modules.module.Module",)
    safe: ClassVar[bool] = False

    def can_save(self, value: Any) -> bool:
        import torch

        return isinstance(value, torch.nn.Module)

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Write the module.

        Raises:
            MaterializerError: The structure cannot be pickled or a tensor cannot be stored.
        """
        import io

        tensors: list[torch.Tensor] = []
        structure = io.BytesIO()
        try:
            _module_pickler(structure, tensors).dump(value)
        except Exception as e:  # pickling can raise nearly anything
            raise MaterializerError(
                f"Cannot pickle the structure of {type_name(type(value))} ({e}); "
                "save module.state_dict() instead and rebuild the module in the next step."
            ) from e
        for i, t in enumerate(tensors):
            if not _storable(t):
                raise MaterializerError(
                    f"Tensor #{i} of {type_name(type(value))} is sparse, quantized or on the meta "
                    "device, which safetensors cannot store; save it with CloudpickleMaterializer."
                )
        fp.write(_MODULE_MAGIC + struct.pack("<Q", structure.tell()))
        fp.write(structure.getbuffer())
        size = _save_tensors(
            {f"t{i}": t for i, t in enumerate(tensors)}, fp, {"kind": "module_tensors"}
        )
        return {
            "module_class": type_name(type(value)),
            "parameters": int(sum(p.numel() for p in value.parameters())),
            "tensors": len(tensors),
            "size_bytes": len(_MODULE_MAGIC) + 8 + structure.tell() + size,
        }

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Rebuild the module on the CPU. This runs pickle on the artifact.

        Raises:
            MaterializerError: The stream is not a module artifact, or refers to code
                this process cannot import.
        """
        import io

        try:
            head = read_exactly(fp, len(_MODULE_MAGIC) + 8)
        except EOFError as e:
            raise MaterializerError(f"The module artifact is truncated ({e}).") from e
        if head[: len(_MODULE_MAGIC)] != _MODULE_MAGIC:
            raise MaterializerError(
                "The artifact is not a module saved by TorchModuleMaterializer; "
                "load it with the materializer recorded for it."
            )
        (length,) = struct.unpack("<Q", head[len(_MODULE_MAGIC) :])
        try:
            structure = read_exactly(fp, length)
        except EOFError as e:
            raise MaterializerError(f"The module artifact is truncated ({e}).") from e
        tensors, _ = _load_tensors(fp)
        try:
            return _ModuleUnpickler(io.BytesIO(structure), tensors).load()
        except (ModuleNotFoundError, AttributeError) as e:
            raise MaterializerError(
                f"Cannot rebuild the module because it refers to code this process cannot "
                f"import ({e}); install the package that defines it on this worker."
            ) from e


def _module_pickler(file: BinaryIO, tensors: list[torch.Tensor]) -> pickle.Pickler:
    """A cloudpickle pickler that lifts every tensor out into ``tensors``."""
    import cloudpickle
    import torch

    class _ModulePickler(cloudpickle.Pickler):
        def __init__(self) -> None:
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
            self._index: dict[int, int] = {}

        def persistent_id(self, obj: Any) -> Any:
            if not isinstance(obj, torch.Tensor):
                return None
            # The same object gets the same index, so tied parameters stay tied.
            idx = self._index.get(id(obj))
            if idx is None:
                idx = self._index[id(obj)] = len(tensors)
                tensors.append(obj)
            kind = "param" if isinstance(obj, torch.nn.Parameter) else "tensor"
            return ("zw_tensor", idx, kind, bool(obj.requires_grad))

    return _ModulePickler()


class _ModuleUnpickler(pickle.Unpickler):
    """Unpickles a module structure, putting the loaded tensors back in place."""

    def __init__(self, file: BinaryIO, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(file)
        self._tensors = tensors
        self._made: dict[int, torch.Tensor] = {}

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "zw_tensor"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, idx, kind, requires_grad = pid
        made = self._made.get(idx)
        if made is None:
            tensor = self._tensors[f"t{idx}"]
            if kind == "param":
                made = torch.nn.Parameter(tensor, requires_grad=requires_grad)
            else:
                made = tensor.requires_grad_(requires_grad) if requires_grad else tensor
            self._made[idx] = made
        return made
