"""Statements on a step attempt's output (table ``step_logs``), each inside a caller's session.

A worker appends an attempt's lines in batches while the step runs; readers (``zw logs
-f``, ``Client().logs()``) read them back in order from a cursor (the last ``seq`` they
saw). One row is one line (or one piece of a very long line) with its stream and time;
the text keeps its line ending, so concatenating the rows gives the output as printed.
``seq`` counts an attempt's lines from 0 without gaps, except where the writer dropped
lines to stay within its bound (see :mod:`zenml_workers.worker.logcapture`): a reader
shows a marker there (:func:`render`). Steps finished before this table existed have
their whole output in ``step_runs.logs``, which now only holds what a worker could not
store here at the end of an attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from typing import cast as type_cast

from sqlalchemy import Table, bindparam, delete, insert, select
from sqlalchemy.orm import Session

from stores.errors import NotFoundError
from stores.metadata.models import StepLogRow
from stores.metadata.statements import STEPS
from stores.metadata.states import StepStatus

LOGS = type_cast(Table, StepLogRow.__table__)

#: The streams a line can come from: ``print()`` and ``sys.stdout``, ``sys.stderr``, a
#: ``logging`` record.
STREAMS = ("stdout", "stderr", "log")


class LogLine(NamedTuple):
    """One stored line of an attempt: its position, stream, time (epoch seconds) and text.

    A named tuple, not a dataclass: a worker makes one per printed line, on the step's
    critical path, and a tuple is made several times faster."""

    seq: int
    stream: str
    ts: float
    text: str


@dataclass(frozen=True)
class LogState:
    """What a reader needs to know of the step run: its status, latest attempt and the text
    kept in ``step_runs.logs`` (a finished step's whole output before ``step_logs``, now
    only what its worker could not store as lines)."""

    status: str
    attempt: int
    stored_text: str

    @property
    def running(self) -> bool:
        return self.status == StepStatus.RUNNING.value

    @property
    def ended(self) -> bool:
        return StepStatus(self.status).is_terminal()

    def stored_text_of(self, attempt: int) -> str:
        """``stored_text`` if it belongs to ``attempt``: the latest one, once it stopped
        running (a running attempt's leftover text is only written with its end)."""
        return self.stored_text if attempt == self.attempt and not self.running else ""


@dataclass(frozen=True)
class LogWrite:
    """What one transaction does to an attempt's lines: store ``lines`` and delete the
    stored lines with ``drop[0] <= seq < drop[1]`` (dropped to stay within the bound)."""

    lines: tuple[LogLine, ...]
    drop: tuple[int, int] | None = None


def append(s: Session, step_run_id: str, attempt: int, write: LogWrite) -> bool:
    """Apply ``write`` to attempt ``attempt``'s lines while that attempt still runs.

    The step run's row is share-locked, so a commit that ends the attempt waits for this
    transaction, or this one sees it ended: returns False, writing nothing, once it has
    ended, lost its lease or was cancelled.
    """
    conn = s.connection()
    current = conn.execute(_HOLDER, {"_id": step_run_id}).first()
    if current is None or current.status != StepStatus.RUNNING.value or current.attempt != attempt:
        return False
    store(s, step_run_id, attempt, write)
    return True


def store(s: Session, step_run_id: str, attempt: int, write: LogWrite | None) -> None:
    """Apply ``write`` to attempt ``attempt``'s lines without checking who holds the step:
    for the transaction that ends the attempt (its guarded ``UPDATE`` did). A line already
    stored (a retry of a batch whose ``COMMIT`` did land) is skipped."""
    if write is None:
        return
    conn = s.connection()
    if write.drop is not None and write.drop[1] > write.drop[0]:
        conn.execute(
            _DROP,
            {"_id": step_run_id, "_attempt": attempt, "_from": write.drop[0], "_to": write.drop[1]},
        )
    if write.lines:
        conn.execute(
            _insert_skipping_duplicates(conn.dialect.name),
            [
                {
                    "step_run_id": step_run_id,
                    "attempt": attempt,
                    "seq": line.seq,
                    "stream": line.stream,
                    "ts": line.ts,
                    "text": line.text,
                }
                for line in write.lines
            ],
        )


#: The attempt holding the step run, share-locked until the append commits.
_HOLDER = (
    select(STEPS.c.status, STEPS.c.attempt)
    .where(STEPS.c.id == bindparam("_id"))
    .with_for_update(read=True)
)
_DROP = delete(LOGS).where(
    LOGS.c.step_run_id == bindparam("_id"),
    LOGS.c.attempt == bindparam("_attempt"),
    LOGS.c.seq >= bindparam("_from"),
    LOGS.c.seq < bindparam("_to"),
)
_INSERTS: dict[str, Any] = {}


def _insert_skipping_duplicates(dialect: str) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for ``dialect``, built once."""
    stmt = _INSERTS.get(dialect)
    if stmt is not None:
        return stmt
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(LOGS).on_conflict_do_nothing(
            index_elements=["step_run_id", "attempt", "seq"]
        )
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(LOGS).on_conflict_do_nothing(
            index_elements=["step_run_id", "attempt", "seq"]
        )
    else:
        stmt = insert(LOGS)
    _INSERTS[dialect] = stmt
    return stmt


def read(
    s: Session,
    step_run_id: str,
    attempt: int,
    *,
    after_seq: int = -1,
    limit: int | None = None,
) -> list[LogLine]:
    """Lines of attempt ``attempt`` with ``seq > after_seq``, in order (at most ``limit``)."""
    stmt = (
        select(LOGS.c.seq, LOGS.c.stream, LOGS.c.ts, LOGS.c.text)
        .where(
            LOGS.c.step_run_id == step_run_id,
            LOGS.c.attempt == attempt,
            LOGS.c.seq > after_seq,
        )
        .order_by(LOGS.c.seq)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [LogLine(r.seq, r.stream, r.ts, r.text) for r in s.connection().execute(stmt)]


def state(s: Session, step_run_id: str) -> LogState:
    """The step run's status, latest attempt and stored text.

    Raises:
        NotFoundError: no step run has this id.
    """
    row = (
        s.connection()
        .execute(
            select(STEPS.c.status, STEPS.c.attempt, STEPS.c.logs).where(STEPS.c.id == step_run_id)
        )
        .first()
    )
    if row is None:
        raise NotFoundError(
            f"no step run with id {step_run_id!r}; list a run's steps with `zw show RUN`"
        )
    return LogState(status=row.status, attempt=row.attempt, stored_text=row.logs or "")


def dropped_marker(count: int) -> str:
    """The line a reader shows where ``count`` lines were dropped to stay within the bound."""
    return f"[... {count} line(s) dropped: this attempt printed more than is kept ...]\n"


def render(lines: Sequence[LogLine], *, after_seq: int = -1) -> str:
    """The text of ``lines`` (read after ``after_seq``), with a marker where lines are missing."""
    parts: list[str] = []
    expected = after_seq + 1
    for line in lines:
        if line.seq > expected:
            parts.append(dropped_marker(line.seq - expected))
        parts.append(line.text)
        expected = line.seq + 1
    return "".join(parts)
