"""Progress rendering without a terminal: counts, wait reasons, final lines, HTML, displays."""

from __future__ import annotations

import dataclasses
import io
import sys
import types
from types import MappingProxyType
from typing import Any

import pytest

from zenml_workers.sdk import display as d
from zenml_workers.sdk import progress as p
from zenml_workers.sdk.client import RunView, StepRunView

RUN = "1a2b3c4d-0000-0000-0000-000000000000"
OTHER = "9f8e7d6c-0000-0000-0000-000000000000"


def _snap(
    *steps: tuple[str, str, str] | tuple[str, str, str, str],
    workers: tuple[p.WorkerState, ...] | None = (),
    **kw: Any,
) -> p.Snapshot:
    return p.Snapshot(
        run_id=RUN,
        pipeline="training",
        status="running",
        steps=tuple(p.StepState(*s) for s in steps),
        workers=workers,
        **kw,
    )


def _step(invocation_id: str, status: str) -> StepRunView:
    # Only the fields without a default; the summary reads none but the status.
    required = {
        f.name: None
        for f in dataclasses.fields(StepRunView)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return StepRunView(**{**required, "invocation_id": invocation_id, "status": status})


def _run(*statuses: str, status: str = "failed", duration_s: float | None = 3.25) -> RunView:
    steps = {f"s{i}": _step(f"s{i}", st) for i, st in enumerate(statuses)}
    return RunView(
        id=RUN,
        name="training-1",
        pipeline="training",
        status=status,
        user="ada",
        orchestrator="local",
        created_at=1000.0,
        ended_at=None if duration_s is None else 1000.0 + duration_s,
        message="",
        config=MappingProxyType({"big": "y" * 10_000}),
        environment=MappingProxyType({"packages": {f"pkg{i}": "1.0" for i in range(300)}}),
        steps=MappingProxyType(steps),
    )


# -- counts and lines -----------------------------------------------------------------------


def test_count_statuses_orders_labels_and_folds_ready_into_pending() -> None:
    counts = p.count_statuses(["skipped", "completed", "ready", "pending", "cached", "failed"])

    assert counts == {"completed": 1, "cached": 1, "pending": 2, "failed": 1, "skipped": 1}
    assert list(counts) == ["completed", "cached", "pending", "failed", "skipped"]


def test_final_line_counts_skipped_and_failed_steps_as_such() -> None:
    line = p.final_line(RUN, "failed", ["completed", "failed", "skipped", "skipped"], 3.25)

    assert line == "run 1a2b3c4d failed after 3.25s; 4 steps: 1 completed, 1 failed, 2 skipped"


def test_final_line_of_a_completed_run_says_in_how_long() -> None:
    line = p.final_line(RUN, "completed", ["completed", "cached", "cached"], 75.0)

    assert line == "run 1a2b3c4d completed in 1m 15s; 3 steps: 1 completed, 2 cached"


def test_headline_counts_every_finished_status_but_not_running_ones() -> None:
    snap = _snap(
        ("a", "completed", "cpu"),
        ("b", "cached", "cpu"),
        ("c", "skipped", "cpu"),
        ("d", "running", "cpu", "cpu@h1"),
        elapsed_s=12.4,
    )

    assert p.headline(snap) == "run 1a2b3c4d (training): 3/4 steps finished, 12s"


def test_render_lines_name_the_worker_of_each_running_step() -> None:
    snap = _snap(("load", "completed", "cpu"), ("train", "running", "gpu", "gpu@box"))

    lines = p.render_lines(snap)

    assert lines[1] == "1 completed, 1 running"
    assert "running: train on gpu@box" in lines


# -- why steps wait -------------------------------------------------------------------------


def test_wait_reason_names_the_busy_worker_and_what_it_runs() -> None:
    gpu = p.WorkerState("gpu@box", ("gpu",), concurrency=1, running=((OTHER, "train"),))
    snap = _snap(("train", "queued", "gpu"), workers=(gpu,))

    assert p.wait_reasons(snap) == [
        "queue 'gpu': 1 step waiting; 1 gpu worker busy with run 9f8e7d6c step train"
    ]


def test_wait_reason_says_when_no_live_worker_consumes_the_queue() -> None:
    cpu = p.WorkerState("cpu@box", ("cpu",), concurrency=4)
    snap = _snap(("a", "queued", "gpu"), ("b", "queued", "gpu"), workers=(cpu,))

    assert p.wait_reasons(snap) == ["queue 'gpu': 2 steps waiting; no live worker consumes it"]


def test_wait_reason_counts_a_worker_with_free_slots_as_not_busy() -> None:
    full = p.WorkerState("cpu1@h", ("cpu",), concurrency=1, running=((RUN, "a"),))
    free = p.WorkerState("cpu2@h", ("cpu",), concurrency=2, running=((OTHER, "x"),))
    snap = _snap(("a", "running", "cpu", "cpu1@h"), ("b", "queued", "cpu"), workers=(full, free))

    assert p.wait_reasons(snap) == [
        "queue 'cpu': 1 step waiting; 2 cpu workers, 1 busy with step a of this run"
    ]


def test_wait_reason_names_at_most_three_jobs() -> None:
    jobs = tuple((OTHER, f"s{i}") for i in range(5))
    snap = _snap(("a", "queued", "cpu"), workers=(p.WorkerState("w", ("cpu",), 5, jobs),))

    (reason,) = p.wait_reasons(snap)

    assert reason.endswith("run 9f8e7d6c step s2 and 2 more")


def test_wait_reason_on_the_embedded_default_names_the_local_processes() -> None:
    snap = _snap(
        ("a", "running", "cpu", "local process 11"),
        ("b", "running", "cpu", "local process 12"),
        ("c", "queued", "cpu"),
        workers=None,
        local_workers=2,
    )

    assert p.wait_reasons(snap) == [
        "1 step waiting for a free local worker process (2 of 2 run steps of this run)"
    ]


def test_wait_reason_for_ready_steps_names_the_run_window_only_when_it_is_full() -> None:
    full = _snap(("a", "queued", "cpu"), ("b", "ready", "cpu"), workers=None, window=1)
    room = _snap(("a", "queued", "cpu"), ("b", "ready", "cpu"), workers=None, window=8)

    assert "ZW_MAX_QUEUED_PER_RUN" in p.wait_reasons(full)[-1]
    assert not any("ZW_MAX_QUEUED_PER_RUN" in r for r in p.wait_reasons(room))


def test_render_line_puts_counts_workers_and_reasons_on_one_line() -> None:
    snap = _snap(("train", "queued", "gpu"), ("eval", "pending", "cpu"), workers=())

    line = p.render_line(snap)

    assert "\n" not in line
    assert line == (
        "run 1a2b3c4d (training): 0/2 steps finished (1 queued, 1 pending); "
        "queue 'gpu': 1 step waiting; no live worker consumes it"
    )


# -- HTML -----------------------------------------------------------------------------------


def test_render_html_escapes_names_and_shows_a_progress_bar() -> None:
    snap = _snap(("a", "completed", "cpu"), ("<b>x</b>", "running", "cpu", "w&1"))

    out = p.render_html(snap, warnings=["queue <gpu> has no worker"])

    assert '<progress value="1" max="2"' in out
    assert "&lt;b&gt;x&lt;/b&gt; on w&amp;1" in out
    assert "<b>x</b>" not in out
    assert "warning: queue &lt;gpu&gt; has no worker" in out


def test_run_view_repr_is_one_short_line_with_its_counts() -> None:
    run = _run("completed", "failed", "skipped", "skipped")

    text = repr(run)

    assert text == (
        f"<RunView {RUN} of 'training': failed, 4 steps (1 completed, 1 failed, 2 skipped), 3.25s>"
    )


def test_run_view_html_summary_has_id_pipeline_status_counts_and_duration() -> None:
    out = _run("completed", "cached", status="completed", duration_s=None)._repr_html_()

    assert RUN in out and "training" in out and "completed" in out
    assert "2: " in out and "1 cached" in out
    assert '<th style="text-align:left">duration</th><td style="text-align:left">-</td>' in out
    assert len(out) < 2000  # a summary, not the config, environment or logs


# -- displays -------------------------------------------------------------------------------


def test_plain_display_prints_a_change_once_and_the_final_line() -> None:
    out = io.StringIO()
    display = d.PlainDisplay(out)
    snap = _snap(("a", "queued", "cpu"), workers=None, local_workers=1)

    display.show(snap)
    display.show(snap)  # the same state: nothing new
    display.finish("run 1a2b3c4d completed in 1.00s; 1 step: 1 completed")

    assert out.getvalue().splitlines() == [
        "run 1a2b3c4d (training): 0/1 steps finished (1 queued); "
        "1 step waiting for a free local worker process (0 of 1 run steps of this run)",
        "run 1a2b3c4d completed in 1.00s; 1 step: 1 completed",
    ]


class FakeHandle:
    def __init__(self, shown: list[Any]) -> None:
        self.shown = shown

    def update(self, obj: Any) -> None:
        self.shown.append(obj)


class FakeDisplay:
    """IPython's ``display(obj, display_id=True)``: records what it shows, returns a handle."""

    def __init__(self) -> None:
        self.shown: list[Any] = []
        self.calls = 0

    def __call__(self, obj: Any, *, display_id: bool) -> FakeHandle:
        assert display_id is True
        self.calls += 1
        self.shown.append(obj)
        return FakeHandle(self.shown)


def test_notebook_display_updates_one_output_in_place() -> None:
    fake = FakeDisplay()
    display = d.NotebookDisplay(fake)

    display.show(_snap(("a", "queued", "gpu"), workers=()))
    display.warn("no worker for gpu")
    display.finish("run 1a2b3c4d completed in 1.00s; 1 step: 1 completed")

    assert fake.calls == 1  # one output, then updates of it
    assert "no live worker consumes it" in fake.shown[0]._repr_html_()
    assert "warning: no worker for gpu" in fake.shown[1]._repr_html_()
    assert "1 step: 1 completed" in fake.shown[-1]._repr_html_()
    assert repr(fake.shown[-1]) == "run 1a2b3c4d completed in 1.00s; 1 step: 1 completed"


def test_terminal_display_draws_the_view_and_keeps_the_final_line() -> None:
    out = io.StringIO()
    display = d.TerminalDisplay(out)
    display.console = type(display.console)(file=out, force_terminal=True, width=100)

    display.show(_snap(("train", "running", "gpu", "gpu@box"), workers=()))
    display.finish("run 1a2b3c4d completed in 1.00s; 1 step: 1 completed")

    text = out.getvalue()
    assert "running: train on gpu@box" in text
    assert text.rstrip().endswith("run 1a2b3c4d completed in 1.00s; 1 step: 1 completed")


def _fake_ipython(monkeypatch: pytest.MonkeyPatch, shell: object | None, fake: FakeDisplay) -> None:
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
    display_module = types.ModuleType("IPython.display")
    display_module.display = fake  # type: ignore[attr-defined]
    ipython.display = display_module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)


def test_choose_display_uses_the_notebook_only_inside_a_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeDisplay()
    _fake_ipython(monkeypatch, types.SimpleNamespace(kernel=object()), fake)
    assert isinstance(d.choose_display(io.StringIO()), d.NotebookDisplay)

    _fake_ipython(monkeypatch, types.SimpleNamespace(), fake)  # terminal IPython: no kernel
    assert isinstance(d.choose_display(io.StringIO()), d.PlainDisplay)


def test_choose_display_without_ipython_picks_by_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "IPython", raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(d.choose_display(Tty()), d.TerminalDisplay)
    assert isinstance(d.choose_display(io.StringIO()), d.PlainDisplay)


# -- the reporter ---------------------------------------------------------------------------


def test_reporter_reads_at_most_one_snapshot_per_interval() -> None:
    reads: list[int] = []
    out = io.StringIO()

    def read() -> p.Snapshot:
        reads.append(1)
        return _snap(("a", "running", "cpu"), workers=None)

    reporter = p.ProgressReporter(
        RUN, enabled=True, read=read, display=d.PlainDisplay(out), min_interval_s=3600
    )
    for _ in range(5):
        reporter.poll()

    assert len(reads) == 1


def test_reporter_with_progress_off_shows_nothing_but_still_warns() -> None:
    out = io.StringIO()
    reads: list[int] = []
    reporter = p.ProgressReporter(
        RUN, enabled=False, read=lambda: reads.append(1) or _snap(), display=d.PlainDisplay(out)
    )

    reporter.poll()
    reporter.finish(_run("completed", status="completed"))
    reporter.warn("queue 'gpu' has no worker")

    assert reads == []
    assert out.getvalue() == "warning: queue 'gpu' has no worker\n"
