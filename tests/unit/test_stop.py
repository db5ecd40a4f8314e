"""Stopping steps without services: the watch's decisions (``now`` given), the child's stop
handlers, what a supervisor settles after a kill, the hand-back move and how an attempt
ended, on SQLite files."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from scheduler import dispatch, outcomes
from scheduler.specs import StepTask
from stores.metadata import attempts
from stores.metadata import queries as q
from stores.metadata import workers as w
from stores.metadata.models import StepRunRow
from stores.metadata.store import MetadataStore
from tests.pipelines import stopping as pl
from tests.pipelines.planning import plan
from zenml_workers.errors import StepTimeoutError
from zenml_workers.settings import Settings
from zenml_workers.worker import stop
from zenml_workers.worker.outcome import Outcome, how_it_ended
from zenml_workers.worker.shutdown import ShutdownGrace

NOW = 1_000_000.0
HOST = "gpu@h"


# -- the watch ---------------------------------------------------------------------------------


def _watch(timeout_s: float | None = 10.0) -> stop.StepWatch:
    return stop.StepWatch("sr", "train", pid=42, started_at=100.0, timeout_s=timeout_s)


def test_stop_watch_times_out_once_then_waits_the_grace_to_kill() -> None:
    watch = _watch(timeout_s=10.0)

    assert not watch.timed_out(109.9)
    assert watch.timed_out(110.0)
    assert watch.next_due(grace_s=5) == 110.0
    watch.reason, watch.asked_at = stop.TIMEOUT, 110.0
    assert not watch.timed_out(200.0)  # asked already
    assert not watch.kill_due(114.9, grace_s=5)
    assert watch.kill_due(115.0, grace_s=5)
    assert watch.next_due(grace_s=5) == 115.0


def test_stop_watch_without_timeout_never_times_out() -> None:
    watch = _watch(timeout_s=None)

    assert not watch.timed_out(1e12)
    assert watch.next_due(grace_s=5) is None


def _state(status: str, attempt: int = 1, pid: int | None = 42, host: str = HOST) -> w.AttemptState:
    return w.AttemptState("sr", status, attempt, host, pid, "sr.1")


def test_stop_watch_judges_cancelled_and_superseded_attempts() -> None:
    watch = _watch()

    assert watch.judge(_state("queued", attempt=0, pid=None), HOST) is None  # not claimed yet
    assert watch.judge(_state("running"), HOST) is None
    assert watch.attempt == 1  # learnt once the child claimed it
    assert watch.judge(_state("queued"), HOST) is None  # its own retry, or a requeue
    assert watch.judge(_state("completed"), HOST) is None  # its own commit
    assert watch.judge(_state("running", attempt=2, pid=7, host="gpu@other"), HOST) == (
        stop.SUPERSEDED
    )
    assert watch.judge(_state("cancelled"), HOST) == stop.CANCEL
    assert watch.judge(None, HOST) is None


def test_stop_watch_judges_nothing_once_asked() -> None:
    watch = _watch()
    watch.reason = stop.TIMEOUT

    assert watch.judge(_state("cancelled"), HOST) is None


# -- the child's handlers ----------------------------------------------------------------------


def _box() -> stop.StopBox:
    import multiprocessing

    return stop.StopBox(multiprocessing.get_context("spawn"))


@pytest.fixture()
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (stop.SOFT_STOP, stop.HAND_BACK)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _armed_stops(box: stop.StopBox | None) -> stop.ChildStops:
    stops = stop.ChildStops(box)
    stops.armed = stop.Armed("sr", "train", timeout_s=3.0)
    return stops


def test_stop_child_raises_what_the_box_asks_for_its_armed_attempt() -> None:
    box = _box()
    stops = _armed_stops(box)

    box.ask(stop.TIMEOUT, "sr")
    with (
        pytest.raises(StepTimeoutError, match="step 'train' ran past its timeout_s of 3 s"),
        stop.step_body(),
    ):
        stops._on_soft_stop(stop.SOFT_STOP, None)
    stops = _armed_stops(box)
    box.ask(stop.CANCEL, "sr")
    with pytest.raises(stop.StepStopped) as info, stop.step_body():
        stops._on_soft_stop(stop.SOFT_STOP, None)
    assert info.value.reason == stop.CANCEL
    assert not isinstance(info.value, Exception)  # a step's `except Exception` cannot keep it


def test_stop_child_ignores_requests_for_another_attempt_and_outside_one() -> None:
    box = _box()
    stops = _armed_stops(box)

    box.ask(stop.CANCEL, "the-previous-step")
    stops._on_soft_stop(stop.SOFT_STOP, None)  # a late request: ignored
    assert stops.armed is not None
    stops.armed = None
    box.ask(stop.CANCEL, "sr")
    stops._on_soft_stop(stop.SOFT_STOP, None)
    stops._on_hand_back(stop.HAND_BACK, None)


def test_stop_child_raises_once_per_attempt() -> None:
    box = _box()
    stops = _armed_stops(box)
    box.ask(stop.TIMEOUT, "sr")

    with stop.step_body():
        with pytest.raises(StepTimeoutError):
            stops._on_soft_stop(stop.SOFT_STOP, None)
        stops._on_soft_stop(stop.SOFT_STOP, None)  # swallowed by the step: the kill comes next


def test_stop_outside_the_step_body_waits_for_it_and_never_hits_a_transaction() -> None:
    box = _box()
    stops = _armed_stops(box)
    box.ask(stop.CANCEL, "sr")

    stops._on_soft_stop(stop.SOFT_STOP, None)  # while claiming: nothing raised here
    with pytest.raises(stop.StepStopped), stop.step_body():
        raise AssertionError("the body must not start")  # pragma: no cover
    stops.arm(stop.Armed("sr2", "train"))
    box.ask(stop.CANCEL, "sr2")
    stops._on_soft_stop(stop.SOFT_STOP, None)  # after the body (committing): pending ...
    stops.arm(None)  # ... and dropped with the attempt
    with stop.step_body():
        pass  # the next attempt's body runs


def test_stop_prefork_sigterm_exits_from_the_step_body_only(
    restore_signals: None,
) -> None:
    exits: list[int] = []
    saved = signal.signal(signal.SIGTERM, lambda signum, _frame: exits.append(signum))
    try:
        stops = _armed_stops(None).install(terminate_cancels=True)
        with pytest.raises(SystemExit), stop.step_body():
            os.kill(os.getpid(), signal.SIGTERM)  # Celery's revoke(terminate=True)
        assert not exits and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # 2nd: kills
        stops = _armed_stops(None).install(terminate_cancels=True)
        os.kill(os.getpid(), signal.SIGTERM)  # while claiming: nothing raised here ...
        with pytest.raises(SystemExit), stop.step_body():  # ... but as the body starts
            raise AssertionError("the body must not start")  # pragma: no cover
        signal.signal(signal.SIGTERM, lambda signum, _frame: exits.append(signum))
        stops = _armed_stops(None).install(terminate_cancels=True)
        stops.arm(None)
        os.kill(os.getpid(), signal.SIGTERM)  # idle: billiard's own handler (here: recorded)
        assert exits == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_stop_prefork_child_turns_the_soft_time_limit_into_step_timeout_error(
    restore_signals: None,
) -> None:
    stops = _armed_stops(None).install()

    with pytest.raises(StepTimeoutError, match="ran past its timeout_s of 3 s"), stop.step_body():
        os.kill(os.getpid(), stop.SOFT_STOP)  # what billiard sends at the soft time limit
    stops.armed = stop.Armed("sr", "train")
    with pytest.raises(stop.StepStopped) as info, stop.step_body():
        os.kill(os.getpid(), stop.HAND_BACK)
    assert info.value.reason == stop.HANDED_BACK


def test_stop_run_stoppable_arms_the_attempt_and_reports_a_stop() -> None:
    stops = stop.ChildStops(None)
    task = StepTask(run_id="r", step_run_id="sr", invocation_id="train", pipeline="p")

    def cancelled(_task: StepTask, _ctx: object) -> list[dispatch.QueuedStep]:
        raise stop.StepStopped(stop.CANCEL, "stopped")

    ran = stop.run_stoppable(task, None, stops, timeout_s=None, execute=cancelled)
    assert (ran.follow, ran.stopped, stops.armed) == ([], stop.CANCEL, None)

    def fine(_task: StepTask, _ctx: object) -> list[dispatch.QueuedStep]:
        assert stops.armed == stop.Armed("sr", "train", 2.0)
        return []

    assert stop.run_stoppable(task, None, stops, timeout_s=2.0, execute=fine) == stop.Ran([])


# -- what the supervisor settles, on SQLite ----------------------------------------------------


def _plan(store: MetadataStore, pipeline: object, **params: object) -> StepTask:
    """Plan a one-step-first run; return its first step's task."""
    spec = pipeline.build(**params).spec  # type: ignore[attr-defined]
    return plan(store, spec, now=NOW)[0].task


def _claim(store: MetadataStore, task: StepTask, pid: int = 42) -> None:
    with store.transaction() as s:
        assert (
            attempts.claim(s, task.step_run_id, host=HOST, pid=pid, lease_s=60, now=NOW) is not None
        )


def _row(store: MetadataStore, task: StepTask) -> StepRunRow:
    with store.read() as s:
        row = s.get(StepRunRow, task.step_run_id)
        assert row is not None
        return row


def _settle(store: MetadataStore, task: StepTask, **kw: object) -> list[dispatch.QueuedStep]:
    settings = Settings(retry_delay_s=0)
    return stop.settle_attempt(store, settings, task, host=HOST, error="StepTimeoutError: x", **kw)  # type: ignore[arg-type]


def test_stop_settle_records_a_killed_attempt_and_returns_its_retry(store: MetadataStore) -> None:
    task = _plan(store, pl.timing_out, marker_dir="/m")  # timeout_s=1, retries=1
    _claim(store, task)

    follow = _settle(store, task, pid=42)

    assert [f.task.step_run_id for f in follow] == [task.step_run_id]  # the retry
    row = _row(store, task)
    assert (row.status, row.exception) == ("queued", "StepTimeoutError: x")


def test_stop_settle_fails_a_killed_attempt_without_retries_and_its_run(
    store: MetadataStore,
) -> None:
    task = _plan(store, pl.stubbornly_timing_out, marker_dir="/m")
    _claim(store, task)

    assert _settle(store, task, pid=None) == []  # any pid of this node (prefork's main process)
    assert _row(store, task).status == "failed"
    with store.read() as s:
        assert q.get_run(s, task.run_id).status == "failed"


def test_stop_settle_leaves_another_process_attempt_and_a_cancelled_step(
    store: MetadataStore,
) -> None:
    task = _plan(store, pl.stubbornly_timing_out, marker_dir="/m")
    _claim(store, task, pid=7)

    assert _settle(store, task, pid=42) == []
    assert _row(store, task).status == "running"
    with store.transaction() as s:
        outcomes.cancel_run(s, task.run_id, now=NOW)
    assert _settle(store, task, pid=7) == []
    assert _row(store, task).status == "cancelled"


def test_stop_settle_resends_a_step_its_dead_process_never_claimed(store: MetadataStore) -> None:
    task = _plan(store, pl.stubbornly_timing_out, marker_dir="/m")

    assert _settle(store, task, pid=42) == []
    (again,) = _settle(store, task, pid=42, resend_unclaimed=True)
    assert again.task.step_run_id == task.step_run_id


# -- hand-back and outcomes --------------------------------------------------------------------


def test_stop_hand_back_requeues_the_attempt_under_its_task_id_without_costing_one(
    store: MetadataStore,
) -> None:
    task = _plan(store, pl.holding, marker_dir="/m")  # no retries: one attempt
    _claim(store, task)
    task_id = _row(store, task).task_id

    with store.transaction() as s:
        assert not w.hand_back(s, task.step_run_id, 1, host=HOST, pid=7, now=NOW, reason="r")
        assert w.hand_back(s, task.step_run_id, 1, host=HOST, pid=42, now=NOW, reason="bye")
        assert not w.hand_back(s, task.step_run_id, 1, host=HOST, pid=42, now=NOW, reason="r")
    row = _row(store, task)
    assert (row.status, row.task_id, row.exception) == ("queued", task_id, "bye")
    _claim(store, task, pid=43)  # another worker takes it: attempt 2 of 2, no retry spent
    row = _row(store, task)
    assert (row.attempt, row.max_attempts) == (2, 2)


def test_stop_how_it_ended_tells_each_outcome(store: MetadataStore) -> None:
    task = _plan(store, pl.timing_out, marker_dir="/m")
    _claim(store, task)
    task_id = _row(store, task).task_id
    ended = how_it_ended(store, task, [], host=HOST, pid=42, task_id=task_id)
    assert ended.outcome is Outcome.DROPPED  # still running: not this delivery's doing

    with store.transaction() as s:
        assert w.hand_back(s, task.step_run_id, 1, host=HOST, pid=42, now=NOW, reason="r")
    ended = how_it_ended(store, task, [], host=HOST, pid=42, task_id=task_id)
    assert ended.outcome is Outcome.HANDED_BACK
    _claim(store, task)
    follow = _settle(store, task, pid=42)
    ended = how_it_ended(store, task, follow, host=HOST, pid=42, task_id=task_id)
    assert (ended.outcome, ended.error) == (Outcome.FAILED, "StepTimeoutError: x")
    with store.transaction() as s:
        outcomes.cancel_run(s, task.run_id, now=NOW)
    ended = how_it_ended(store, task, [], host=HOST, pid=42, task_id=task_id)
    assert ended.outcome is Outcome.CANCELLED
    successor = dispatch.QueuedStep(
        StepTask("r", "other", "next", "p"), queue="cpu", task_id="t", step_name="next"
    )
    assert how_it_ended(None, task, [successor], host=HOST, pid=42, task_id=None).outcome is (
        Outcome.COMPLETED  # a successor was queued: no read needed
    )


def test_stop_shutdown_grace_is_due_after_the_grace_or_a_second_signal() -> None:
    settings = SimpleNamespace(shutdown_grace_s=600.0, stop_grace_s=1.0)
    grace = ShutdownGrace(None, settings, "w@h", sweep=False)  # type: ignore[arg-type]

    assert not grace.due()
    grace.signalled("Warm")
    assert not grace.due()
    grace.signalled("Warm")
    assert grace.due()
    cold = ShutdownGrace(None, settings, "w@h", sweep=False)  # type: ignore[arg-type]
    cold.signalled("Cold")
    assert cold.due()
    quick = ShutdownGrace(None, SimpleNamespace(shutdown_grace_s=0.0), "w@h", sweep=False)  # type: ignore[arg-type]
    quick.signalled("Warm")
    assert quick.due()


def test_stop_settings_refuse_a_negative_grace_naming_it() -> None:
    from zenml_workers.errors import ConfigurationError
    from zenml_workers.settings import load_settings

    with pytest.raises(ConfigurationError, match="stop_grace_s"):
        load_settings(stop_grace_s=-1)
    with pytest.raises(ConfigurationError, match="stop_check_interval_s"):
        load_settings(stop_check_interval_s=0)
    assert load_settings(shutdown_grace_s=0).shutdown_grace_s == 0
