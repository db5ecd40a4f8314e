"""``examples/quickstart.py`` end to end, as a new user runs it: a subprocess on the embedded default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.py"


@pytest.fixture(scope="module")
def quickstart_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Stdout of one run of the quickstart in a fresh ``ZW_HOME`` (it must exit 0)."""
    home = tmp_path_factory.mktemp("zw-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZW_")}
    env.update(ZW_HOME=str(home), ZW_LOCAL_WORKERS="2")
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, (
        f"quickstart exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    assert (home / "metadata.db").exists()
    return proc.stdout


def _summaries(output: str) -> list[tuple[int, int, str]]:
    """(cached, total, ran) of each run summary, in order."""
    return [
        (int(c), int(t), ran)
        for c, t, ran in re.findall(r"^\s+(\d+)/(\d+) steps cached; ran: (.*)$", output, re.M)
    ]


def test_quickstart_prints_an_accuracy_above_point_eight(quickstart_output: str) -> None:
    accuracies = [float(a) for a in re.findall(r"^accuracy: ([0-9.]+)$", quickstart_output, re.M)]

    assert accuracies, quickstart_output
    assert all(a > 0.8 for a in accuracies), accuracies


def test_quickstart_first_run_computes_every_step(quickstart_output: str) -> None:
    first = _summaries(quickstart_output)[0]

    assert first == (0, 4, "load_data, split, train, evaluate")
    for step in ("load_data", "split", "train", "evaluate"):
        assert re.search(rf"^\s+{step}\s+completed\s", quickstart_output, re.M), step
    assert re.search(r"^run [0-9a-f-]{36} \(training-.*\): completed$", quickstart_output, re.M)
    assert "metadata: sqlite:///" in quickstart_output
    assert "artifacts: /" in quickstart_output


def test_quickstart_second_run_is_all_cached(quickstart_output: str) -> None:
    second = _summaries(quickstart_output)[1]

    assert second == (4, 4, "nothing")


def test_quickstart_third_run_reruns_only_train_and_evaluate(quickstart_output: str) -> None:
    third = _summaries(quickstart_output)[2]

    assert third == (2, 4, "train, evaluate")
    assert re.search(
        r"^\s+train: its parameters changed: .*\"epochs\":300", quickstart_output, re.M
    )
    assert re.search(r"^\s+split: cache hit", quickstart_output, re.M)
    assert re.search(r"^\s+evaluate: the content of input 'model' changed", quickstart_output, re.M)
    assert "epoch 300: log loss" in quickstart_output
