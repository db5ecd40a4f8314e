"""A corrupted artifact on the embedded default: loads fail naming it, the consuming step fails
before its body runs, and no later run takes it as a cache hit. Plus the metadata side on
SQLite and PostgreSQL: the migration, and cache lookups that skip corrupt outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from stores.artifacts.local import LocalArtifactStore
from stores.metadata import queries as q
from stores.metadata.models import ArtifactRow
from stores.metadata.store import HEAD_REVISION, MIGRATIONS_DIR, MetadataStore
from tests.integration.test_metadata_store_contract import (
    drive,
    pipeline,
    plan,
    statuses,
    step,
)
from tests.integration.test_metadata_store_contract import store as store  # noqa: F401 - fixture
from tests.pipelines import fixtures, integrity
from zenml_workers import Client
from zenml_workers.errors import ArtifactIntegrityError, InfrastructureError, StepFailedError
from zenml_workers.sdk.stack import get_stack
from zenml_workers.settings import Settings

#: The embedded-default stack fixture, used by name as a test argument.
local_stack = fixtures.local_stack

SUM = sum(range(20))


def _corrupt(uri: str, how: str) -> None:
    """Change a committed artifact's file in place, as bit rot or a bad copy would."""
    path = LocalArtifactStore("/").path_for(uri)
    data = bytearray(path.read_bytes())
    if how == "flip":
        # A digit becomes another digit: the JSON still parses, only the hash can tell.
        at = data.index(b"7")
        data[at] = ord("8")
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


def _corrupted_at(settings: Settings, artifact_id: str) -> float | None:
    with get_stack(settings).metadata.read() as s:
        row = s.get(ArtifactRow, artifact_id)
        assert row is not None
        return row.corrupted_at


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupted_artifact_load_raises_and_the_rerun_does_not_reuse_it(
    local_stack: Settings, how: str
) -> None:
    first = integrity.produce_and_consume(n=20)
    art = first.steps["produce"].outputs["values"]
    _corrupt(art.uri, how)

    with pytest.raises(ArtifactIntegrityError) as info:
        Client().get_run(first.id).steps["produce"].outputs["values"].load()

    err = info.value
    assert not isinstance(err, InfrastructureError)
    assert (err.artifact_id, err.artifact_name, err.run_id, err.step) == (
        art.id,
        "values",
        first.id,
        "produce",
    )
    assert err.expected_hash == art.content_hash != err.actual_hash
    message = str(err)
    for part in (art.id, art.uri, first.id, "step 'produce'", art.content_hash, err.actual_hash):
        assert part in message, part
    assert "cache hit" in message
    if how == "truncate":
        assert "truncated" in message and err.actual_size_bytes < art.size_bytes
    assert _corrupted_at(local_stack, art.id) is not None

    second = integrity.produce_and_consume(n=20)

    produce = second.steps["produce"]
    assert produce.status == "completed"  # not a cache hit on the corrupt artifact
    assert produce.output.id != art.id
    assert produce.output.content_hash == art.content_hash
    assert produce.output.load() == list(range(20))
    assert second.steps["consume"].output.load() == SUM


def test_step_consuming_a_corrupted_artifact_fails_before_its_body(
    local_stack: Settings, tmp_path: Path
) -> None:
    first = integrity.produce_and_consume(n=20)
    art = first.steps["produce"].outputs["values"]
    _corrupt(art.uri, "flip")
    marker = tmp_path / "consume-ran"

    # Not yet known corrupt, so 'produce' is a cache hit and hands the bad file to 'consume'.
    with pytest.raises(StepFailedError) as info:
        integrity.produce_and_consume(n=20, marker=str(marker))

    assert info.value.step == "consume"
    assert not marker.exists()
    run = Client().get_run(info.value.run_id)
    assert run.steps["produce"].status == "cached"
    consume = run.steps["consume"]
    assert consume.status == "failed"
    assert consume.attempt == 1
    assert consume.exception.startswith(
        "ArtifactIntegrityError: Input 'values' of step 'consume' cannot be loaded: "
        "artifact 'values'"
    )
    for part in (art.id, art.uri, f"step 'produce' of run {first.id}", art.content_hash):
        assert part in consume.exception, part
    assert "consume body ran" not in consume.logs
    assert "ArtifactIntegrityError" in info.value.remote_traceback
    assert _corrupted_at(local_stack, art.id) is not None
    with pytest.raises(ArtifactIntegrityError):
        art.load()

    third = integrity.produce_and_consume(n=20, marker=str(marker))

    assert third.steps["produce"].status == "completed"
    assert third.steps["consume"].output.load() == SUM
    assert marker.read_text() == "ran"


# -- the metadata side, on SQLite and PostgreSQL -------------------------------------------------


def test_cache_lookup_skips_a_step_run_with_a_corrupt_output(store: MetadataStore) -> None:  # noqa: F811
    spec = pipeline(step("a"), step("b", inputs={"x": ["a"]}))
    first, queued = plan(store, spec)
    drive(store, queued)
    with store.transaction() as s:
        a_out = q.output_artifacts(s, first, ["a"])[("a", "output")]
        origin = q.mark_artifact_corrupt(s, a_out.id, now=123.0)
    assert origin is not None and origin[0] == first and origin[1] == "a"

    second, queued = plan(store, spec, now=2_000_000.0)

    # 'a' runs again; 'b' waits for it rather than being cached on the corrupt output.
    assert [x.task.invocation_id for x in queued] == ["a"]
    drive(store, queued)
    assert statuses(store, second) == {"a": "completed", "b": "cached"}
    with store.read() as s:
        assert q.mark_artifact_corrupt(s, "no-such-artifact", now=1.0) is None


def test_migration_adds_corrupted_at_to_an_existing_database(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001_initial")
        conn.execute(
            text(
                "INSERT INTO artifacts (id, name, uri, data_type, materializer, content_hash, "
                "size_bytes, artifact_metadata, producer_run_id, producer_step_run_id, created_at) "
                "VALUES ('old', 'v', 'file:///x', 'builtins:int', 'm:M', 'sha256:0', 1, '{}', "
                "'r', 's', 1.0)"
            )
        )
    engine.dispose()

    store = MetadataStore(url)
    store.migrate()

    assert store.current_revision() == HEAD_REVISION
    columns = {c["name"] for c in inspect(store.engine).get_columns("artifacts")}
    assert "corrupted_at" in columns
    with store.read() as s:
        row = s.get(ArtifactRow, "old")
        assert row is not None and row.corrupted_at is None
    store.dispose()
