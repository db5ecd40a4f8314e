"""A small tabular pipeline: a pandas DataFrame and numpy arrays flowing between steps.

Used by the embedded-run tests to check that the pandas and numpy materializers
round-trip real data between worker processes.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import pandas as pd

from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step

COLUMNS = ("a", "b", "c")


@step
def make_frame(rows: int = 20, seed: int = 0) -> Annotated[pd.DataFrame, "frame"]:
    """``rows`` rows of reproducible random floats plus an integer ``id`` column."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(rows, len(COLUMNS))), columns=list(COLUMNS))
    frame["id"] = np.arange(rows, dtype=np.int64)
    return frame


@step
def to_matrix(frame: pd.DataFrame) -> Annotated[np.ndarray, "matrix"]:
    """The float columns as a ``(rows, 3)`` float64 array."""
    return frame[list(COLUMNS)].to_numpy(dtype=np.float64)


@step
def column_means(matrix: np.ndarray) -> Annotated[np.ndarray, "means"]:
    """Mean of each column."""
    return matrix.mean(axis=0)


@step
def report(frame: pd.DataFrame, means: np.ndarray) -> Annotated[dict, "report"]:
    """Row count, id sum and the column means as a JSON-able dict."""
    return {
        "rows": len(frame),
        "id_sum": int(frame["id"].sum()),
        "means": [float(m) for m in means],
    }


@pipeline
def tabular(rows: int = 20, seed: int = 0) -> None:
    """make_frame -> to_matrix -> column_means; report reads the frame and the means."""
    frame = make_frame(rows=rows, seed=seed)
    report(frame, column_means(to_matrix(frame)))


def expected_report(rows: int = 20, seed: int = 0) -> dict:
    """What ``report`` returns for these parameters, computed in this process."""
    frame = make_frame.entrypoint(rows=rows, seed=seed)
    means = frame[list(COLUMNS)].to_numpy(dtype=np.float64).mean(axis=0)
    return {"rows": rows, "id_sum": int(frame["id"].sum()), "means": [float(m) for m in means]}
