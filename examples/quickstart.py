"""Quickstart: a small, real ML pipeline on the embedded default (no servers needed).

Four steps -- make a data set, split it, train a logistic regression with plain
numpy gradient descent, evaluate it -- run in local worker processes. Runs,
steps and artifacts are recorded in SQLite and a local folder under
``ZW_HOME`` (default ``~/.zenml-workers``).

The script runs the pipeline three times:

1. and prints the accuracy and a summary of the run;
2. again with the same parameters: every step is a cache hit;
3. with more epochs: only ``train`` and ``evaluate`` run again, and
   ``Client().explain_cache`` says why.

Run it with ``make demo`` or ``.venv/bin/python examples/quickstart.py``. The
same code runs on a Celery cluster once ``ZW_BROKER_URL`` and friends are set
(see the README).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated

import numpy as np
import pandas as pd

from zenml_workers import Client, pipeline, step, submit, trainer

if TYPE_CHECKING:
    from zenml_workers.sdk.client import RunView

FEATURES = ["x0", "x1", "x2", "x3"]

logger = logging.getLogger("quickstart")


@step
def load_data(rows: int = 1000, seed: int = 0) -> Annotated[pd.DataFrame, "dataset"]:
    """A synthetic, almost linearly separable binary classification data set."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(FEATURES)))
    true_weights = np.array([2.0, -3.0, 1.0, 0.0])
    noise = rng.normal(scale=0.5, size=rows)
    df = pd.DataFrame(x, columns=FEATURES)
    df["label"] = (x @ true_weights + 0.5 + noise > 0).astype(int)
    return df


@step
def split(
    dataset: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Annotated[pd.DataFrame, "train"], Annotated[pd.DataFrame, "test"]]:
    """Shuffle and cut the data set into a training and a test set."""
    shuffled = dataset.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n_test = int(len(shuffled) * test_fraction)
    return shuffled.iloc[n_test:].reset_index(drop=True), shuffled.iloc[:n_test].reset_index(
        drop=True
    )


# @trainer is @step for training code: on a cluster it goes to the "gpu" queue.
@trainer
def train(data: pd.DataFrame, epochs: int = 100, lr: float = 0.5) -> Annotated[dict, "model"]:
    """Fit a logistic regression by full-batch gradient descent on the log loss."""
    x = data[FEATURES].to_numpy()
    y = data["label"].to_numpy()
    weights, bias = np.zeros(x.shape[1]), 0.0
    for epoch in range(1, epochs + 1):
        p = 1.0 / (1.0 + np.exp(-(x @ weights + bias)))
        weights -= lr * x.T @ (p - y) / len(y)
        bias -= lr * float(np.mean(p - y))
        if epoch % 50 == 0 or epoch == epochs:
            loss = -np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))
            # Both print() and logging inside a step end up in the step's captured logs.
            logger.info("epoch %d: log loss %.4f", epoch, loss)
    return {"weights": weights.tolist(), "bias": bias, "features": FEATURES}


@step
def evaluate(model: dict, test: pd.DataFrame) -> Annotated[float, "accuracy"]:
    """Share of test rows the model classifies correctly."""
    logits = test[model["features"]].to_numpy() @ np.array(model["weights"]) + model["bias"]
    return float(np.mean((logits > 0).astype(int) == test["label"].to_numpy()))


@pipeline
def training(rows: int = 1000, epochs: int = 100, lr: float = 0.5) -> None:
    """load_data -> split -> train -> evaluate."""
    dataset = load_data(rows=rows)
    train_set, test_set = split(dataset)
    model = train(train_set, epochs=epochs, lr=lr)
    evaluate(model, test_set)


def summarize(run: RunView) -> None:
    """Print one line per step: status, duration and outputs."""
    print(f"run {run.id} ({run.name}): {run.status}")
    for st in run.steps.values():
        duration = f"{st.duration_s:.3f}s" if st.duration_s is not None else "-"
        print(
            f"  {st.invocation_id:<10} {st.status:<10} {duration:>8}  outputs: {', '.join(st.outputs)}"
        )
    cached = [st.invocation_id for st in run.steps.values() if st.is_cached]
    ran = [st.invocation_id for st in run.steps.values() if not st.is_cached]
    print(f"  {len(cached)}/{len(run.steps)} steps cached; ran: {', '.join(ran) or 'nothing'}")


def main() -> None:
    # 1. Calling a pipeline runs it and blocks until it ends.
    run = training()
    accuracy = run.steps["evaluate"].output.load()
    print(f"accuracy: {accuracy:.3f}")
    summarize(run)
    stack = run.config["stack"]
    print(f"metadata: {stack['metadata_url']}")
    print(f"artifacts: {stack['artifact_uri']}")

    # 2. Same code, same parameters, same inputs: every step is a cache hit.
    print("\nsecond run, same parameters:")
    summarize(training())

    # 3. submit() returns at once; wait() blocks. Only the steps downstream of
    #    the changed parameter run again.
    print("\nthird run, epochs=300:")
    handle = submit(training, epochs=300)
    run = handle.wait()
    summarize(run)
    print(f"accuracy: {run.steps['evaluate'].output.load():.3f}")
    # Why was a step (not) a cache hit? Also on the command line: `zw explain RUN STEP`.
    client = Client()
    print("why each step was (not) a cache hit:")
    for step_name in ("split", "train", "evaluate"):
        for reason in client.explain_cache(run, step_name):
            print(f"  {step_name}: {reason}")
    print("\ncaptured logs of train:")
    print(run.steps["train"].logs.rstrip())


if __name__ == "__main__":
    main()
