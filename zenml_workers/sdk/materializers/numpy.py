"""NumPy arrays and scalars as ``.npy`` streams, with pickling disabled both ways."""

from __future__ import annotations

from typing import Any, BinaryIO, ClassVar

from zenml_workers.errors import MaterializerError
from zenml_workers.sdk.materializers.base import Materializer

__all__ = ["NumpyMaterializer"]


class NumpyMaterializer(Materializer):
    """Saves ``numpy.ndarray`` (and numpy scalars) in the ``.npy`` format.

    The writer is not a real file, so numpy streams the data in chunks of about
    16 MiB on save and 256 KiB on load: a large array is never copied into a
    second full-size buffer. ``np.load`` is not used because it seeks back after
    sniffing the magic bytes; :func:`numpy.lib.format.read_array` reads straight
    through. Arrays of Python objects are refused (they would need pickle) and
    fall back to the pickle materializer, as do masked arrays (the mask would be lost).
    Numpy scalars come back as scalars of the same type.
    """

    handles: ClassVar[tuple[str, ...]] = ("numpy.ndarray", "numpy.generic")
    safe: ClassVar[bool] = True

    def can_save(self, value: Any) -> bool:
        import numpy as np

        if isinstance(value, np.ma.MaskedArray):
            return False
        if isinstance(value, (np.ndarray, np.generic)):
            return bool(not value.dtype.hasobject and type(value.dtype)._legacy)
        return False

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Write ``value`` as ``.npy`` without pickle.

        Raises:
            MaterializerError: The array holds Python objects or a user-defined dtype.
        """
        import numpy as np

        arr = np.asarray(value)
        try:
            np.save(fp, arr, allow_pickle=False)
        except ValueError as e:
            raise MaterializerError(
                f"NumpyMaterializer cannot save an array of dtype {arr.dtype} ({e}); "
                "convert it to a numeric or string dtype, or let it fall back to pickle."
            ) from e
        return {"shape": list(arr.shape), "dtype": str(arr.dtype), "size_bytes": int(arr.nbytes)}

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Read an ``.npy`` stream, refusing pickled object arrays.

        Raises:
            MaterializerError: The stream is not a valid ``.npy`` or is truncated.
        """
        import numpy as np
        from numpy.lib import format as npy_format

        try:
            arr = npy_format.read_array(fp, allow_pickle=False)
        except ValueError as e:
            raise MaterializerError(
                f"The artifact is not a readable .npy stream ({e}); it is corrupt, truncated "
                "or was written by another materializer."
            ) from e
        if isinstance(data_type, type) and issubclass(data_type, np.generic) and arr.ndim == 0:
            return arr[()]
        return arr
