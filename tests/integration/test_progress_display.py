"""What ``wait()`` shows while a real run goes on: plain lines on a pipe, one updating output
in a notebook, nothing with ``progress=False``; and the snapshot query on a real store.

Runs use the embedded default (local worker processes, SQLite, a local folder).
"""

from __future__ import annotations

import re
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from tests.pipelines import basic, failing, faults, fixtures
from tests.services.process import wait_until
from zenml_workers import submit
from zenml_workers.errors import StepFailedError
from zenml_workers.sdk.client import RunView
from zenml_workers.sdk.progress import read_snapshot, wait_reasons
from zenml_workers.sdk.stack import close_stacks, get_stack
from zenml_workers.settings import Settings

local_stack = fixtures.local_stack

RUN_TIMEOUT_S = 90.0


def _lines_of(run_id: str, err: str) -> list[str]:
    """The progress lines of one run (worker log lines name the full run id, not ``run <8>``)."""
    return [line for line in err.splitlines() if line.startswith(f"run {run_id[:8]} ")]


def test_wait_on_a_pipe_prints_plain_progress_and_the_final_line(
    local_stack: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While ``hold`` blocks, a plain line says what runs where; the last line sums it up."""
    handle = submit(faults.diamond, marker_dir=str(tmp_path), seed=1, tag="p", width=3)
    done: dict[str, RunView] = {}
    waiter = threading.Thread(target=lambda: done.update(run=handle.wait(RUN_TIMEOUT_S)))
    waiter.start()
    err: list[str] = []

    def shows_hold_running() -> bool:
        err.append(capsys.readouterr().err)
        return "running hold on local process" in "".join(err)

    try:
        wait_until(shows_hold_running, RUN_TIMEOUT_S, "a progress line naming the held step")
    finally:
        (tmp_path / "release-p").touch()
        waiter.join(RUN_TIMEOUT_S)
    err.append(capsys.readouterr().err)

    assert not waiter.is_alive() and done["run"].status == "completed"
    lines = _lines_of(handle.id, "".join(err))
    held = next(line for line in lines if "running hold" in line)
    assert re.fullmatch(
        rf"run {handle.id[:8]} \(diamond\): 1/6 steps finished, \d+s "
        r"\(1 completed, 1 running, 4 pending\); running hold on local process \d+",
        held,
    ), lines
    assert re.fullmatch(
        rf"run {handle.id[:8]} completed in [\d.]+s; 6 steps: 6 completed", lines[-1]
    ), lines
    assert not any("\x1b[" in line for line in lines)  # no terminal control codes on a pipe


def test_wait_final_line_counts_the_failed_and_skipped_steps(
    local_stack: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    handle = submit(failing.exploding, n=1)
    with pytest.raises(StepFailedError):
        handle.wait(timeout_s=RUN_TIMEOUT_S)

    lines = _lines_of(handle.id, capsys.readouterr().err)
    assert re.fullmatch(
        rf"run {handle.id[:8]} failed after [\d.]+s; 3 steps: 1 completed, 1 failed, 1 skipped",
        lines[-1],
    ), lines


def test_wait_with_progress_off_prints_nothing(
    local_stack: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    run = submit(basic.chain, n=4).wait(timeout_s=RUN_TIMEOUT_S, progress=False)

    assert run.status == "completed"
    assert capsys.readouterr().err == ""


class _Handle:
    def __init__(self, shown: list[Any]) -> None:
        self.shown = shown

    def update(self, obj: Any) -> None:
        self.shown.append(obj)


class _Display:
    """Stands in for ``IPython.display.display``: records each shown or updated object."""

    def __init__(self) -> None:
        self.shown: list[Any] = []
        self.outputs = 0

    def __call__(self, obj: Any, *, display_id: bool) -> _Handle:
        assert display_id is True
        self.outputs += 1
        self.shown.append(obj)
        return _Handle(self.shown)


def test_wait_in_a_notebook_kernel_updates_one_html_output(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = _Display()
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())  # type: ignore[attr-defined]
    display_module = types.ModuleType("IPython.display")
    display_module.display = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)

    run = submit(basic.diamond, n=2).wait(timeout_s=RUN_TIMEOUT_S)

    assert fake.outputs == 1  # one output in the cell, updated in place
    assert len(fake.shown) >= 2
    assert "<progress" in fake.shown[0]._repr_html_()
    assert f"run {run.id[:8]} completed in" in fake.shown[-1]._repr_html_()
    assert "4 steps: 4 completed" in fake.shown[-1]._repr_html_()
    assert _lines_of(run.id, capsys.readouterr().err) == []  # not on stderr as well


# -- the snapshot query ---------------------------------------------------------------------


def test_read_snapshot_names_the_live_worker_busy_with_another_run(tmp_path: Path) -> None:
    """One read returns this run's steps and the live gpu worker running another run's step;
    a worker whose heartbeat is old is not counted."""
    from stores.metadata.models import PipelineRow, RunRow, StepRunRow, WorkerRow

    settings = Settings(
        broker_url="redis://127.0.0.1:9/0",  # never contacted: only the store is read
        metadata_url=f"sqlite:///{tmp_path / 'meta.db'}",
        home=tmp_path,
        queues=["cpu", "gpu"],
        worker_ttl_s=10,
    )
    stack = get_stack(settings)
    now = time.time()
    mine, other = "a" * 8 + "-run", "b" * 8 + "-run"
    try:
        with stack.metadata.transaction() as s:
            s.add(PipelineRow(id="p", name="training", created_at=now))
            for rid in (mine, other):
                s.add(
                    RunRow(
                        id=rid, pipeline_id="p", pipeline_name="training", name=rid,
                        status="running", spec="{}", created_at=now - 30,
                    )
                )  # fmt: skip

            def step(rid: str, inv: str, status: str, queue: str, host: str | None) -> StepRunRow:
                return StepRunRow(
                    id=f"{rid}-{inv}", run_id=rid, invocation_id=inv, step_name=inv,
                    status=status, queue=queue, code_hash="c", source_hash="s",
                    worker_host=host, started_at=now - 5 if host else None,
                )  # fmt: skip

            s.add_all(
                [
                    step(mine, "load", "completed", "cpu", "cpu@box"),
                    step(mine, "train", "queued", "gpu", None),
                    step(other, "train", "running", "gpu", "gpu@box"),
                ]
            )
            s.add_all(
                [
                    WorkerRow(
                        name="gpu@box", queues=["gpu"], host="box", pid=1,
                        started_at=now - 60, heartbeat_at=now - 1, concurrency=1,
                    ),
                    WorkerRow(
                        name="gpu@gone", queues=["gpu"], host="gone", pid=2,
                        started_at=now - 600, heartbeat_at=now - 300, concurrency=1,
                    ),
                ]
            )  # fmt: skip

        snap = read_snapshot(stack, mine, now=now)
    finally:
        close_stacks()

    assert [(st.invocation_id, st.status, st.worker) for st in snap.steps] == [
        ("load", "completed", "cpu@box"),
        ("train", "queued", None),
    ]
    assert snap.pipeline == "training" and snap.elapsed_s == pytest.approx(30)
    assert wait_reasons(snap) == [
        "queue 'gpu': 1 step waiting; 1 gpu worker busy with run bbbbbbbb step train"
    ]
