"""Materializers: how step outputs become artifact streams and come back.

Importing this package imports none of numpy, pandas, torch, pyarrow or
safetensors; each materializer imports its library when it is used.
"""

from __future__ import annotations

from zenml_workers.sdk.materializers.base import Materializer
from zenml_workers.sdk.materializers.builtins import BytesMaterializer, JsonMaterializer
from zenml_workers.sdk.materializers.numpy import NumpyMaterializer
from zenml_workers.sdk.materializers.pandas import DataFrameMaterializer, SeriesMaterializer
from zenml_workers.sdk.materializers.pickle import CloudpickleMaterializer
from zenml_workers.sdk.materializers.registry import (
    FALLBACK_MATERIALIZER,
    load_materializer,
    materializer_for_type,
    materializer_for_value,
    materializer_path,
    register_materializer,
    register_value_materializer,
    resolve_type,
    type_path,
)
from zenml_workers.sdk.materializers.torch import (
    TorchModuleMaterializer,
    TorchStateDictMaterializer,
    TorchTensorMaterializer,
)

__all__ = [
    "FALLBACK_MATERIALIZER",
    "BytesMaterializer",
    "CloudpickleMaterializer",
    "DataFrameMaterializer",
    "JsonMaterializer",
    "Materializer",
    "NumpyMaterializer",
    "SeriesMaterializer",
    "TorchModuleMaterializer",
    "TorchStateDictMaterializer",
    "TorchTensorMaterializer",
    "load_materializer",
    "materializer_for_type",
    "materializer_for_value",
    "materializer_path",
    "register_materializer",
    "register_value_materializer",
    "resolve_type",
    "type_path",
]
