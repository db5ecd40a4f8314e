"""``step_logs`` statements (stores/metadata/logs.py) on SQLite and a real PostgreSQL."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from scheduler import outcomes
from scheduler.specs import OutputSpec, PipelineSpec, StepSpec
from stores.metadata import attempts, logs
from stores.metadata.logs import LogLine, LogWrite
from stores.metadata.store import MetadataStore
from tests.pipelines.planning import plan

NOW = 1_000_000.0
JSON_MAT = "zenml_workers.sdk.materializers.builtins:JsonMaterializer"
CODE = b"code of talk"
CODE_HASH = "sha256:" + hashlib.sha256(CODE).hexdigest()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[MetadataStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'meta.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    st = MetadataStore(url)
    yield st
    st.dispose()


def _running_step(st: MetadataStore) -> Any:
    """A one-step run whose step is claimed (attempt 1, running)."""
    spec = PipelineSpec(
        name="logs",
        steps=(
            StepSpec(
                invocation_id="talk",
                name="talk",
                code_hash=CODE_HASH,
                source_hash="sha256:s",
                outputs=(OutputSpec("output", "builtins:int", JSON_MAT),),
                # Each call makes a step of its own: an identical one would wait for the
                # first (single-flight) instead of being queued.
                enable_cache=False,
            ),
        ),
    )
    blob = {"code_hash": CODE_HASH, "name": "talk", "source": "", "pickled": CODE}
    queued = plan(st, spec, code_blobs=[blob], window=8, orchestrator="test", now=NOW)
    with st.transaction() as s:
        return attempts.claim(s, queued[0].task.step_run_id, host="h", pid=1, lease_s=60, now=NOW)


def _lines(start: int, stop: int, stream: str = "stdout") -> list[LogLine]:
    return [LogLine(i, stream, NOW + i, f"line {i}\n") for i in range(start, stop)]


def _append(
    st: MetadataStore, row: Any, lines: list[LogLine], drop: tuple[int, int] | None = None
) -> bool:
    with st.transaction() as s:
        return logs.append(s, row.id, row.attempt, LogWrite(tuple(lines), drop))


def test_step_logs_append_and_read_from_a_cursor(store: MetadataStore) -> None:
    row = _running_step(store)

    assert _append(store, row, _lines(0, 3))
    assert _append(store, row, [LogLine(3, "log", NOW, "2026 INFO x: rec\n")])

    with store.read() as s:
        everything = logs.read(s, row.id, row.attempt)
        after = logs.read(s, row.id, row.attempt, after_seq=1)
        page = logs.read(s, row.id, row.attempt, after_seq=-1, limit=2)
        other_attempt = logs.read(s, row.id, row.attempt + 1)
    assert [(ln.seq, ln.stream, ln.ts) for ln in everything] == [
        (0, "stdout", NOW),
        (1, "stdout", NOW + 1),
        (2, "stdout", NOW + 2),
        (3, "log", NOW),
    ]
    assert [ln.seq for ln in after] == [2, 3]
    assert [ln.seq for ln in page] == [0, 1]
    assert other_attempt == []
    assert logs.render(everything) == "line 0\nline 1\nline 2\n2026 INFO x: rec\n"


def test_step_logs_append_skips_lines_already_stored(store: MetadataStore) -> None:
    row = _running_step(store)
    assert _append(store, row, _lines(0, 2))

    assert _append(store, row, _lines(0, 4))  # a retried batch whose COMMIT had landed

    with store.read() as s:
        assert [ln.seq for ln in logs.read(s, row.id, row.attempt)] == [0, 1, 2, 3]


def test_step_logs_append_deletes_dropped_lines_and_readers_mark_the_gap(
    store: MetadataStore,
) -> None:
    row = _running_step(store)
    assert _append(store, row, _lines(0, 10))

    assert _append(store, row, _lines(10, 11), drop=(2, 8))

    with store.read() as s:
        kept = logs.read(s, row.id, row.attempt)
    assert [ln.seq for ln in kept] == [0, 1, 8, 9, 10]
    assert logs.render(kept) == (
        "line 0\nline 1\n" + logs.dropped_marker(6) + "line 8\nline 9\nline 10\n"
    )


def test_step_logs_append_refuses_an_attempt_that_ended(store: MetadataStore) -> None:
    row = _running_step(store)
    assert _append(store, row, _lines(0, 1))
    with store.transaction() as s:
        assert attempts.complete_attempt(s, row.id, row.attempt, ended_at=NOW + 5) is not None

    assert not _append(store, row, _lines(1, 2))  # nothing lands after the step is finished

    with store.read() as s:
        assert [ln.seq for ln in logs.read(s, row.id, row.attempt)] == [0]
        state = logs.state(s, row.id)
    assert (state.status, state.attempt, state.ended) == ("completed", 1, True)


def test_step_logs_append_refuses_a_superseded_attempt(store: MetadataStore) -> None:
    row = _running_step(store)

    with store.transaction() as s:
        assert not logs.append(s, row.id, row.attempt - 1, LogWrite(tuple(_lines(0, 1))))
        assert not logs.append(s, str(uuid.uuid4()), 1, LogWrite(tuple(_lines(0, 1))))


def test_step_logs_ride_the_transaction_that_ends_the_attempt(store: MetadataStore) -> None:
    done, failed = _running_step(store), _running_step(store)
    values = {"logs": "", outcomes.LOG_LINES: LogWrite(tuple(_lines(0, 2)), drop=None)}

    with store.transaction() as s:
        assert (
            outcomes.step_succeeded(
                s, done, attempt=done.attempt, artifacts=[], edges=[], values=values, now=NOW + 1
            )
            is not None
        )
        assert (
            outcomes.step_failed(
                s,
                failed,
                attempt=failed.attempt,
                error="ValueError: no",
                traceback="",
                values=values,
                now=NOW + 1,
                retry_allowed=False,
            )
            == []
        )

    assert outcomes.LOG_LINES in values  # the caller's values are left as they were
    with store.read() as s:
        for row in (done, failed):
            assert logs.render(logs.read(s, row.id, row.attempt)) == "line 0\nline 1\n"
            assert logs.state(s, row.id).ended


def test_step_logs_are_not_stored_by_an_attempt_that_lost_its_lease(
    store: MetadataStore,
) -> None:
    row = _running_step(store)
    values = {"logs": "", outcomes.LOG_LINES: LogWrite(tuple(_lines(0, 1)))}

    with store.transaction() as s:
        assert (
            outcomes.step_succeeded(
                s, row, attempt=row.attempt + 1, artifacts=[], edges=[], values=values, now=NOW
            )
            is None
        )

    with store.read() as s:
        assert logs.read(s, row.id, row.attempt) == []
        assert logs.read(s, row.id, row.attempt + 1) == []
