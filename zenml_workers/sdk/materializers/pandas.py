"""pandas DataFrames and Series as Parquet (through pyarrow)."""

from __future__ import annotations

import json
from typing import Any, BinaryIO, ClassVar

from zenml_workers.errors import MaterializerError
from zenml_workers.sdk.materializers.base import Materializer, WriteSink, read_all

__all__ = ["DataFrameMaterializer", "SeriesMaterializer"]

#: Key, in the Parquet schema metadata, marking a file that holds one Series.
_SERIES_KEY = b"zenml_workers.series"
#: Column a Series is stored under.
_SERIES_COLUMN = "__series__"

#: ``pandas.api.types.infer_dtype`` results for object columns that pyarrow maps
#: faithfully; anything else ("mixed", dicts, custom objects) goes to pickle.
_ARROW_OBJECT_KINDS = frozenset(
    {"empty", "string", "bytes", "boolean", "integer", "floating", "decimal", "date", "datetime"}
)


def _columns_ok(df: Any) -> bool:
    import pandas as pd

    columns = df.columns
    if isinstance(columns, pd.MultiIndex) or not columns.is_unique:
        return False
    if not all(type(c) is str for c in columns):
        return False
    for _, col in df.items():
        if col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) not in (
            _ARROW_OBJECT_KINDS
        ):
            return False
    return True


def _write_parquet(df: Any, fp: BinaryIO, extra: dict[bytes, bytes] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df)
    if extra:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    # Parquet only appends and asks tell() for offsets, so it streams into the
    # non-seekable writer; WriteSink supplies the file-object bits pyarrow checks.
    pq.write_table(table, WriteSink(fp))


def _read_parquet(fp: BinaryIO) -> Any:
    """Return the pyarrow Table; Parquet keeps its index at the end, so it needs the whole file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(read_all(fp)))
    except (pa.ArrowInvalid, OSError) as e:
        raise MaterializerError(
            f"The artifact is not a readable Parquet file ({e}); it is corrupt, truncated "
            "or was written by another materializer."
        ) from e


class DataFrameMaterializer(Materializer):
    """Saves a ``pandas.DataFrame`` as Parquet, keeping its index and dtypes.

    Column names must be unique strings and object columns must hold values
    pyarrow maps faithfully (strings, bytes, numbers, dates); other frames are
    refused by :meth:`can_save` and fall back to pickle. Loading reads the whole
    file into memory once, because Parquet's footer sits at the end.
    """

    # pandas 3 reports ``__module__ == "pandas"``; pandas 2 the defining module.
    handles: ClassVar[tuple[str, ...]] = ("pandas.core.frame.DataFrame", "pandas.DataFrame")
    safe: ClassVar[bool] = True

    def can_save(self, value: Any) -> bool:
        import pandas as pd

        return isinstance(value, pd.DataFrame) and _columns_ok(value)

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Write the frame as Parquet.

        Raises:
            MaterializerError: pyarrow cannot convert a column.
        """
        import pyarrow as pa

        try:
            _write_parquet(value, fp)
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise MaterializerError(
                f"Cannot write the DataFrame as Parquet ({e}); give its columns "
                "pyarrow-compatible dtypes or save it with CloudpickleMaterializer."
            ) from e
        return {
            "rows": int(len(value)),
            "columns": [str(c) for c in value.columns][:100],
            "dtypes": {str(c): str(t) for c, t in list(value.dtypes.items())[:100]},
        }

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Read the Parquet stream back into a DataFrame.

        Raises:
            MaterializerError: The stream is not valid Parquet.
        """
        return _read_parquet(fp).to_pandas()


class SeriesMaterializer(Materializer):
    """Saves a ``pandas.Series`` as a one-column Parquet file, keeping its name and index."""

    handles: ClassVar[tuple[str, ...]] = ("pandas.core.series.Series", "pandas.Series")
    safe: ClassVar[bool] = True

    def can_save(self, value: Any) -> bool:
        import pandas as pd

        if not isinstance(value, pd.Series):
            return False
        if value.name is not None and type(value.name) not in (str, int, float):
            return False
        return _columns_ok(value.to_frame(name=_SERIES_COLUMN))

    def save(self, value: Any, fp: BinaryIO) -> dict[str, Any]:
        """Write the series as Parquet, its name kept in the schema metadata.

        Raises:
            MaterializerError: pyarrow cannot convert the values.
        """
        import pyarrow as pa

        marker = json.dumps({"name": value.name}).encode("utf-8")
        try:
            _write_parquet(value.to_frame(name=_SERIES_COLUMN), fp, {_SERIES_KEY: marker})
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise MaterializerError(
                f"Cannot write the Series as Parquet ({e}); give it a pyarrow-compatible "
                "dtype or save it with CloudpickleMaterializer."
            ) from e
        return {"rows": int(len(value)), "dtype": str(value.dtype), "name": str(value.name)}

    def load(self, fp: BinaryIO, data_type: type | None) -> Any:
        """Read the Parquet stream back into a Series.

        Raises:
            MaterializerError: The stream is not valid Parquet or holds no Series.
        """
        table = _read_parquet(fp)
        marker = (table.schema.metadata or {}).get(_SERIES_KEY)
        if marker is None:
            raise MaterializerError(
                "The Parquet artifact holds a DataFrame, not a Series; "
                "load it with DataFrameMaterializer."
            )
        series = table.to_pandas()[_SERIES_COLUMN]
        series.name = json.loads(marker)["name"]
        return series
