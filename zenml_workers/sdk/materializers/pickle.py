"""The fallback materializer: cloudpickle, for values no other materializer takes."""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO, ClassVar

from zenml_workers.errors import MaterializerError
from zenml_workers.sdk.materializers.base import Materializer, buffered_reader, type_name

__all__ = ["CloudpickleMaterializer"]


class CloudpickleMaterializer(Materializer):
    """Saves any picklable value with cloudpickle.

    Classes and functions importable by the worker are pickled by reference;
    those defined in ``__main__`` or interactively are pickled by value.

    Loading runs pickle, which can execute arbitrary code from the artifact, so
    only load artifacts from stores you trust (``safe`` is False). Pickles can
    also break when library versions differ between the saving and loading
    process; register a dedicated materializer for values that must last.
    """

    handles: ClassVar[tuple[str, ...]] = ()
    safe: ClassVar[bool] = False

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Pickle ``value`` straight into ``fp`` (no intermediate buffer).

        Raises:
            MaterializerError: ``value`` cannot be pickled.
        """
        import cloudpickle

        try:
            cloudpickle.dump(value, fp, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # pickling can raise nearly anything (TypeError, PicklingError...)
            raise MaterializerError(
                f"Cannot pickle a value of type {type_name(type(value))} ({e}); "
                "register a materializer for it with register_materializer()."
            ) from e
        return {"python_type": type_name(type(value))}

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Unpickle the value. This executes code from the stream.

        Raises:
            MaterializerError: The stream is not a pickle, or names code this process cannot import.
        """
        try:
            return pickle.load(buffered_reader(fp))
        except (ModuleNotFoundError, AttributeError) as e:
            raise MaterializerError(
                f"Cannot unpickle the artifact because it refers to code this process cannot "
                f"import ({e}); install the same package versions as the process that saved it."
            ) from e
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise MaterializerError(
                f"The artifact is not a valid pickle ({e}); it is corrupt or was written by "
                "another materializer, so load it with the materializer recorded for it."
            ) from e
