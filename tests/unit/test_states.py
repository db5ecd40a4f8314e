"""The state table: every status change is one of its moves, and the statements use it."""

from __future__ import annotations

import pytest

from stores.metadata import statements as sql
from stores.metadata.states import (
    MOVES,
    STEP_TRANSITIONS,
    UNSTARTED,
    Move,
    StepStatus,
    sources,
    target,
)


def test_states_table_allows_exactly_the_moves() -> None:
    allowed = {(src, dst) for src, targets in STEP_TRANSITIONS.items() for dst in targets}
    from_moves = {(src, dst) for srcs, dst in MOVES.values() for src in srcs}

    assert allowed == from_moves
    assert set(MOVES) == set(Move)


@pytest.mark.parametrize("status", [st for st in StepStatus if st.is_terminal()])
def test_states_terminal_status_never_changes(status: StepStatus) -> None:
    assert STEP_TRANSITIONS[status] == frozenset()
    assert not any(status in srcs for srcs, _ in MOVES.values())


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (StepStatus.PENDING, StepStatus.RUNNING),
        (StepStatus.READY, StepStatus.RUNNING),
        (StepStatus.QUEUED, StepStatus.COMPLETED),
        (StepStatus.RUNNING, StepStatus.SKIPPED),
        (StepStatus.RUNNING, StepStatus.READY),
        (StepStatus.RUNNING, StepStatus.PENDING),
        (StepStatus.COMPLETED, StepStatus.QUEUED),
        (StepStatus.CANCELLED, StepStatus.QUEUED),
        (StepStatus.WAITING, StepStatus.RUNNING),  # a waiter computes only after taking over
        (StepStatus.WAITING, StepStatus.QUEUED),
        (StepStatus.WAITING, StepStatus.COMPLETED),
        (StepStatus.RUNNING, StepStatus.WAITING),
    ],
)
def test_states_illegal_transitions_are_refused(src: StepStatus, dst: StepStatus) -> None:
    assert not src.can_become(dst)


def test_states_sources_narrowing_outside_the_move_is_a_programming_error() -> None:
    assert sources(Move.CANCEL, (StepStatus.RUNNING,)) == ["running"]
    with pytest.raises(ValueError, match="cannot start from step status completed"):
        sources(Move.CANCEL, (StepStatus.COMPLETED,))


def _where_statuses(statement: object) -> set[str]:
    """Status literals bound in a compiled statement's WHERE clause."""
    compiled = statement.compile()  # type: ignore[attr-defined]
    values: list[object] = []
    for v in compiled.params.values():
        values.extend(v if isinstance(v, list | tuple) else [v])
    return {v for v in values if isinstance(v, str) and v in set(StepStatus)}


@pytest.mark.parametrize(
    ("statement", "move"),
    [
        (sql.CLAIM, Move.CLAIM),
        (sql.TAKE_OVER, Move.TAKE_OVER),
        (sql.COMPLETE, Move.COMPLETE),
        (sql.QUEUE_READY, Move.QUEUE),
        (sql.SET_STEP, Move.SETTLE_READY),
    ],
)
def test_states_hot_path_statements_are_guarded_by_their_move(
    statement: object, move: Move
) -> None:
    bound = _where_statuses(statement)

    assert set(sources(move)) <= bound
    assert target(move) in bound or move is Move.SETTLE_READY  # settle binds its status per row
    # Nothing but the move's sources and target appears.
    assert bound <= {*sources(move), target(move), "running"}


def test_states_unstarted_are_the_sources_of_skip() -> None:
    assert sorted(st.value for st in UNSTARTED) == sources(Move.SKIP)


def test_states_every_settle_move_shares_its_source() -> None:
    # SET_STEP settles to ready, cached or waiting in one executemany, guarded once.
    assert sources(Move.SETTLE_READY) == sources(Move.SETTLE_CACHED) == sources(Move.SETTLE_WAIT)


def test_states_a_waiting_step_lands_cached_takes_over_or_ends_with_its_run() -> None:
    assert STEP_TRANSITIONS[StepStatus.WAITING] == {
        StepStatus.CACHED,
        StepStatus.READY,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
    }
    assert not StepStatus.WAITING.is_terminal()
    assert StepStatus.WAITING in UNSTARTED


def test_states_flight_statements_are_guarded_by_their_move() -> None:
    from stores.metadata import flights as fl

    assert _where_statuses(fl._LAND) == {*sources(Move.LAND), target(Move.LAND)}
