"""Managing the cache on SQLite: which entries are offered, listed and cleared, what gc
selects and deletes, and what a check marks; every clock is a ``now`` parameter."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from scheduler import decisions, outcomes
from scheduler.specs import OutputSpec, PipelineSpec, StepSpec
from stores.artifacts.memory import MemoryArtifactStore
from stores.metadata import attempts
from stores.metadata import cache as mc
from stores.metadata import queries as q
from stores.metadata.models import ArtifactRow, LineageRow, PipelineRow, RunRow, StepRunRow
from stores.metadata.store import MetadataStore
from tests.pipelines.planning import plan
from zenml_workers.errors import CacheError, StepDefinitionError
from zenml_workers.sdk.cache_admin import period_seconds
from zenml_workers.sdk.step import step

DAY = 86_400.0
NOW = 1_700_000_000.0


@dataclass
class Rows:
    """Writes runs, step runs, artifacts and lineage as a finished pipeline would have."""

    store: MetadataStore
    objects: MemoryArtifactStore | None = None

    def run(
        self, *, user: str = "alice", pipeline: str = "training", ended_at: float | None, **kw: Any
    ) -> str:
        rid = str(uuid.uuid4())
        with self.store.transaction() as s:
            pid = s.execute(select(PipelineRow.id).where(PipelineRow.name == pipeline)).scalar()
            if pid is None:
                pid = str(uuid.uuid4())
                s.execute(insert(PipelineRow).values(id=pid, name=pipeline, created_at=0.0))
            status = kw.pop("status", "running" if ended_at is None else "completed")
            created_at = kw.pop("created_at", (ended_at or NOW) - 60)
            s.execute(
                insert(RunRow).values(
                    id=rid,
                    pipeline_id=pid,
                    pipeline_name=pipeline,
                    name=rid,
                    status=status,
                    spec="{}",
                    user=user,
                    created_at=created_at,
                    ended_at=ended_at,
                    **kw,
                )
            )
        return rid

    def step(
        self,
        run_id: str,
        inv: str,
        *,
        key: str | None,
        ended_at: float | None,
        status: str = "completed",
        outputs: dict[str, bytes] | None = None,
        cached_from: str | None = None,
        inputs: dict[str, str] | None = None,
        expires_at: float | None = None,
    ) -> tuple[str, dict[str, str]]:
        """A step run; ``outputs`` are new artifacts (name: bytes) unless ``cached_from`` is
        given (then the original's artifacts are linked). Returns (id, {output: artifact id})."""
        sid = str(uuid.uuid4())
        made: dict[str, str] = {}
        with self.store.transaction() as s:
            s.execute(
                insert(StepRunRow).values(
                    id=sid,
                    run_id=run_id,
                    invocation_id=inv,
                    step_name=inv,
                    status="cached" if cached_from else status,
                    code_hash="c",
                    source_hash="s",
                    cache_key=key,
                    ended_at=ended_at,
                    cached_from_step_run_id=cached_from,
                    cache_expires_at=expires_at,
                )
            )
            if cached_from is not None:
                for name, _, art in q.step_artifacts(s, cached_from, q.OUTPUT):
                    made[name] = art.id
            else:
                for name, data in (outputs or {}).items():
                    aid = str(uuid.uuid4())
                    uri = f"memory://none/{aid}"
                    if self.objects is not None:
                        self.objects.objects[aid] = data
                        uri = self.objects.uri_for(aid)
                    s.execute(
                        insert(ArtifactRow).values(
                            id=aid,
                            name=name,
                            uri=uri,
                            data_type="builtins.bytes",
                            materializer="m",
                            content_hash="sha256:" + hashlib.sha256(data).hexdigest(),
                            size_bytes=len(data),
                            producer_run_id=run_id,
                            producer_step_run_id=sid,
                            created_at=(ended_at or NOW) - 1,
                        )
                    )
                    made[name] = aid
            edges = [(q.OUTPUT, n, a) for n, a in made.items()]
            edges += [(q.INPUT, n, a) for n, a in (inputs or {}).items()]
            for direction, name, aid in edges:
                s.execute(
                    insert(LineageRow).values(
                        step_run_id=sid,
                        direction=direction,
                        name=name,
                        artifact_id=aid,
                        run_id=run_id,
                    )
                )
        return sid, made


@pytest.fixture
def rows(store: MetadataStore) -> Rows:
    return Rows(store, MemoryArtifactStore(f"gc-{uuid.uuid4().hex[:8]}"))


def _hits(store: MetadataStore, *keys: str, now: float) -> dict[str, q.CacheHit]:
    with store.read() as s:
        return q.cache_hits(s, keys, now=now)


# -- what is offered ------------------------------------------------------------------------


def test_cache_hits_skip_expired_cleared_missing_and_corrupt_entries(rows: Rows) -> None:
    run = rows.run(ended_at=NOW - DAY)
    fresh, _ = rows.step(run, "a", key="k-a", ended_at=NOW - DAY, outputs={"x": b"1"})
    rows.step(run, "b", key="k-b", ended_at=NOW - DAY, outputs={"x": b"2"}, expires_at=NOW + 5)
    _, lost = rows.step(run, "c", key="k-c", ended_at=NOW - DAY, outputs={"x": b"3"})
    _, bad = rows.step(run, "d", key="k-d", ended_at=NOW - DAY, outputs={"x": b"4"})
    assert set(_hits(rows.store, "k-a", "k-b", "k-c", "k-d", now=NOW)) == {
        "k-a",
        "k-b",
        "k-c",
        "k-d",
    }
    with rows.store.transaction() as s:
        mc.mark_checked(s, missing=[lost["x"]], corrupted=[bad["x"]], now=NOW)
    # b expires at NOW + 5: offered just before, not at that time.
    assert set(_hits(rows.store, "k-a", "k-b", "k-c", "k-d", now=NOW + 4.9)) == {"k-a", "k-b"}
    assert set(_hits(rows.store, "k-a", "k-b", "k-c", "k-d", now=NOW + 5)) == {"k-a"}
    assert _hits(rows.store, "k-a", now=NOW)["k-a"].step_run_id == fresh


def test_an_older_good_entry_is_offered_when_the_newest_is_cleared(rows: Rows) -> None:
    old_run, new_run = rows.run(ended_at=NOW - 2 * DAY), rows.run(ended_at=NOW - DAY)
    old, _ = rows.step(old_run, "a", key="k", ended_at=NOW - 2 * DAY, outputs={"x": b"1"})
    rows.step(new_run, "a", key="k", ended_at=NOW - DAY, outputs={"x": b"1"})
    with rows.store.transaction() as s:
        assert mc.clear_entries(s, now=NOW, run_id=new_run) == 1
    assert _hits(rows.store, "k", now=NOW + 1)["k"].step_run_id == old


# -- listing and clearing -------------------------------------------------------------------


def test_list_entries_counts_hits_sizes_and_users_and_filters(rows: Rows) -> None:
    a_run = rows.run(user="alice", ended_at=NOW - 3 * DAY)
    load, _ = rows.step(
        a_run,
        "load",
        key="k-load",
        ended_at=NOW - 3 * DAY,
        outputs={"df": b"x" * 10, "meta": b"yy"},
    )
    rows.step(a_run, "train", key="k-train", ended_at=NOW - 3 * DAY, outputs={"model": b"m"})
    for ended in (NOW - 2 * DAY, NOW - DAY):
        b_run = rows.run(user="bob", pipeline="training_b", ended_at=ended)
        rows.step(b_run, "load", key="k-load", ended_at=ended, cached_from=load)
    rows.step(rows.run(ended_at=None), "pending", key=None, ended_at=None, status="running")
    with rows.store.read() as s:
        entries = {e.step: e for e in mc.list_entries(s, now=NOW)}
        only_train = mc.list_entries(s, now=NOW, step="train")
        of_b = mc.list_entries(s, now=NOW, pipeline="training_b")
    assert set(entries) == {"load", "train"}  # cached step runs and keyless ones are no entries
    e = entries["load"]
    assert (e.user, e.pipeline, e.run_id, e.outputs, e.size_bytes) == (
        "alice",
        "training",
        a_run,
        2,
        12,
    )
    assert (e.hits, e.last_used_at, e.expires_at) == (2, NOW - DAY, None)
    assert entries["train"].hits == 0 and entries["train"].last_used_at is None
    assert [x.step for x in only_train] == ["train"]
    assert of_b == []  # B's runs made no entries of their own: they reused A's


def test_clear_entries_by_step_pipeline_run_and_age_counts_what_it_cleared(rows: Rows) -> None:
    old, new = rows.run(ended_at=NOW - 10 * DAY), rows.run(pipeline="other", ended_at=NOW - DAY)
    for run, ended in ((old, NOW - 10 * DAY), (new, NOW - DAY)):
        for inv in ("load", "train"):
            rows.step(run, inv, key=f"{run}-{inv}", ended_at=ended, outputs={"x": b"1"})

    def clear(**kw: Any) -> int:
        with rows.store.transaction() as s:
            return mc.clear_entries(s, now=NOW, **kw)

    assert clear(step="train", pipeline="training") == 1
    assert clear(step="train", pipeline="training") == 0  # already cleared: not counted again
    assert clear(ended_before=NOW - 7 * DAY) == 1  # old load
    assert clear(run_id=new) == 2
    with rows.store.read() as s:
        assert mc.list_entries(s, now=NOW) == []
        states = {
            (e.run_id, e.step): e.state(NOW)
            for e in mc.list_entries(s, now=NOW, include_expired=True)
        }
        history = s.execute(select(StepRunRow.status, StepRunRow.cache_key)).all()
    assert set(states.values()) == {"expired"} and len(states) == 4
    assert len(history) == 4 and all(st == "completed" and k for st, k in history)


def test_period_seconds_reads_text_timedeltas_and_numbers_and_refuses_the_rest() -> None:
    assert period_seconds("30d", "older_than") == 30 * DAY
    assert period_seconds(timedelta(hours=2), "older_than") == 7200
    assert period_seconds(0, "older_than") == 0
    for bad in ("soon", "-1d", -5, timedelta(seconds=-1)):
        with pytest.raises(
            CacheError, match=r"older_than=.* is not an age; give .* 30m, 12h or 7d"
        ):
            period_seconds(bad, "older_than")  # type: ignore[arg-type]


# -- cache_expires_after --------------------------------------------------------------------


def test_step_cache_expires_after_takes_text_timedelta_or_seconds() -> None:
    def body() -> int:
        return 1

    assert step(cache_expires_after="7d")(body).config.cache_expires_after_s == 7 * DAY
    assert step(cache_expires_after=timedelta(minutes=5))(body).config.cache_expires_after_s == 300
    assert step(cache_expires_after=0.5)(body).config.cache_expires_after_s == 0.5
    assert step(body).config.cache_expires_after_s is None
    changed = step(body).with_options(cache_expires_after="1h")
    assert changed.config.cache_expires_after_s == 3600
    for bad in ("tomorrow", 0, -1, True):
        with pytest.raises(
            StepDefinitionError, match=r"step 'body': cache_expires_after=.*positive period"
        ):
            step(cache_expires_after=bad)(body)


def test_a_committed_step_expires_cache_expires_after_s_later(store: MetadataStore) -> None:
    spec = PipelineSpec(
        name="expiring",
        steps=(
            StepSpec(
                invocation_id="a",
                name="a",
                code_hash="c",
                source_hash="s",
                outputs=(OutputSpec("x", "builtins.int"),),
                cache_expires_after_s=30.0,
            ),
        ),
    )
    spec_plain = replace(
        spec, name="plain", steps=(replace(spec.steps[0], cache_expires_after_s=None),)
    )
    # Committed at t, it is a hit until t + 30 s; then the same step computes again (the
    # expiry is no ingredient of the key) and, committed without one, stays a hit.
    for sp, at in ((spec, NOW), (spec_plain, NOW + 31)):
        [task] = plan(store, sp, now=at)
        with store.transaction() as s:
            row = attempts.claim(s, task.task.step_run_id, host="h", pid=1, lease_s=60, now=at)
            aid = str(uuid.uuid4())
            art = {
                "id": aid,
                "name": "x",
                "uri": f"memory://e/{aid}",
                "data_type": "builtins.int",
                "materializer": "m",
                "content_hash": "sha256:0",
                "size_bytes": 1,
                "artifact_metadata": {},
                "producer_run_id": row.run_id,
                "producer_step_run_id": row.id,
                "created_at": at,
            }
            edge = decisions.lineage_edge(row.id, row.run_id, q.OUTPUT, "x", 0, aid)
            outcomes.step_succeeded(
                s, row, attempt=row.attempt, artifacts=[art], edges=[edge], values={}, now=at
            )
        if sp is spec:
            assert plan(store, spec_plain, now=NOW + 29.9) == []  # a hit before it expires
    assert plan(store, spec, now=NOW + 1000) == []
    with store.read() as s:
        expiry = s.execute(
            select(StepRunRow.status, StepRunRow.cache_expires_at).order_by(StepRunRow.ended_at)
        ).all()
        keys = {k for (k,) in s.execute(select(StepRunRow.cache_key))}
    assert [tuple(r) for r in expiry] == [
        ("completed", NOW + 30),
        ("cached", None),
        ("completed", None),
        ("cached", None),
    ]
    assert len(keys) == 1


# -- garbage collection ---------------------------------------------------------------------


def test_gc_keeps_what_kept_and_running_runs_refer_to(rows: Rows) -> None:
    cutoff = NOW - 30 * DAY
    old = rows.run(ended_at=NOW - 40 * DAY)
    load, load_out = rows.step(old, "load", key="k1", ended_at=NOW - 40 * DAY, outputs={"df": b"d"})
    _, split_out = rows.step(old, "split", key="k2", ended_at=NOW - 40 * DAY, outputs={"a": b"a"})
    _, stale_out = rows.step(old, "train", key="k3", ended_at=NOW - 40 * DAY, outputs={"m": b"m"})
    # A recent run reused load; a run that started long ago is still running and reads split.
    recent = rows.run(user="bob", ended_at=NOW - DAY)
    rows.step(recent, "load", key="k1", ended_at=NOW - DAY, cached_from=load)
    running = rows.run(ended_at=None, created_at=NOW - 50 * DAY)
    rows.step(
        running, "train", key=None, ended_at=None, status="queued", inputs={"a": split_out["a"]}
    )
    # A failed old run's artifact and a new one of an old-but-never-ended run.
    failed = rows.run(ended_at=NOW - 35 * DAY, status="failed")
    _, failed_out = rows.step(
        failed, "load", key="k4", ended_at=NOW - 35 * DAY, outputs={"df": b"x"}
    )
    with rows.store.read() as s:
        garbage = {g.id for g in mc.find_garbage(s, before=cutoff)}
    assert garbage == {stale_out["m"], failed_out["df"]}
    assert load_out["df"] not in garbage and split_out["a"] not in garbage


def test_delete_artifacts_fails_on_the_foreign_key_when_a_kept_run_links_one_meanwhile(
    rows: Rows,
) -> None:
    cutoff = NOW - 30 * DAY
    old = rows.run(ended_at=NOW - 40 * DAY)
    entry, out = rows.step(old, "load", key="k", ended_at=NOW - 40 * DAY, outputs={"df": b"d"})
    with rows.store.read() as s:
        garbage = mc.find_garbage(s, before=cutoff)
    assert [g.id for g in garbage] == [out["df"]]
    # A run planned between the listing and the delete links the entry as a cache hit.
    rows.step(rows.run(ended_at=None), "load", key="k", ended_at=None, cached_from=entry)
    with pytest.raises(IntegrityError), rows.store.transaction() as s:
        mc.delete_artifacts(s, garbage, before=cutoff)
    with rows.store.transaction() as s:  # the re-check inside the transaction skips it
        assert mc.find_garbage(s, before=cutoff, among=[g.id for g in garbage]) == []
        assert q.get_artifact(s, out["df"]).uri


# -- through the client: objects deleted and checked ----------------------------------------


@pytest.fixture
def client(tmp_path: Path, rows: Rows) -> Any:
    from zenml_workers.sdk.client import Client
    from zenml_workers.sdk.stack import close_stacks
    from zenml_workers.settings import load_settings

    assert rows.objects is not None
    settings = load_settings(
        home=tmp_path / "home", metadata_url=rows.store.url, artifact_uri=rows.objects.root_uri
    )
    try:
        yield Client(settings)
    finally:
        close_stacks()


def test_gc_dry_run_deletes_nothing_and_gc_deletes_metadata_then_objects(
    rows: Rows, client: Any
) -> None:
    assert rows.objects is not None
    old = rows.run(ended_at=NOW - 40 * DAY)
    entry, out = rows.step(old, "load", key="k", ended_at=NOW - 40 * DAY, outputs={"df": b"12345"})
    keep_run = rows.run(ended_at=NOW - DAY)
    _, kept = rows.step(keep_run, "train", key="k2", ended_at=NOW - DAY, outputs={"m": b"m"})
    before = dict(rows.objects.objects)

    report = client.gc("30d", dry_run=True, now=NOW)
    assert (report.dry_run, report.artifacts, report.size_bytes) == (True, 1, 5)
    assert rows.objects.objects == before and _hits(rows.store, "k", now=NOW)

    report = client.gc("30d", now=NOW)
    assert (report.artifacts, report.size_bytes, report.in_use, report.failed_uris) == (1, 5, 0, ())
    assert set(rows.objects.objects) == {kept["m"]}
    with rows.store.read() as s:
        assert s.get(ArtifactRow, out["df"]) is None
        assert s.get(StepRunRow, entry) is not None  # the run's history stays
        assert s.execute(select(LineageRow).where(LineageRow.step_run_id == entry)).all() == []
    assert _hits(rows.store, "k", now=NOW) == {}  # its entry is no longer offered
    assert client.gc("30d", now=NOW).artifacts == 0


def test_check_artifacts_marks_missing_and_altered_objects_and_unmarks_restored_ones(
    rows: Rows, client: Any
) -> None:
    assert rows.objects is not None
    run = rows.run(ended_at=NOW - DAY)
    _, gone = rows.step(run, "load", key="k-load", ended_at=NOW - DAY, outputs={"df": b"data"})
    _, altered = rows.step(run, "train", key="k-train", ended_at=NOW - DAY, outputs={"m": b"model"})
    rows.step(run, "eval", key="k-eval", ended_at=NOW - DAY, outputs={"score": b"0.9"})
    saved = rows.objects.objects.pop(gone["df"])
    rows.objects.objects[altered["m"]] = b"modeL"

    report = client.check_artifacts(now=NOW)
    assert report.checked == 3 and report.restored == 0
    assert [(a.id, a.name, a.problem) for a in report.missing] == [(gone["df"], "df", "missing")]
    assert [a.id for a in report.corrupted] == [altered["m"]]
    assert set(_hits(rows.store, "k-load", "k-train", "k-eval", now=NOW)) == {"k-eval"}
    states = {e.step: e.state for e in client.list_cache(include_expired=True, now=NOW)}
    assert states == {"load": "lost", "train": "lost", "eval": "live"}

    rows.objects.objects[gone["df"]] = saved
    again = client.check_artifacts(now=NOW + 1)
    assert (len(again.lost), again.restored) == (1, 1)
    assert set(_hits(rows.store, "k-load", "k-train", "k-eval", now=NOW)) == {"k-load", "k-eval"}


def test_why_not_offered_names_a_cleared_a_lost_and_an_unfinished_entry(
    rows: Rows, client: Any
) -> None:
    from zenml_workers.sdk.cache_admin import why_not_offered

    run = rows.run(ended_at=NOW - DAY)
    rows.step(run, "a", key="k-a", ended_at=NOW - DAY, outputs={"x": b"1"}, expires_at=NOW - 1)
    _, lost = rows.step(run, "b", key="k-b", ended_at=NOW - DAY, outputs={"x": b"2"})
    rows.step(run, "c", key="k-c", ended_at=None, status="failed")
    with rows.store.transaction() as s:
        mc.mark_checked(s, missing=[lost["x"]], now=NOW)
    assert "was cleared (`zw cache clear`)" in why_not_offered(client._stack, "k-a", at=NOW)
    assert "are lost from the artifact store" in why_not_offered(client._stack, "k-b", at=NOW)
    assert "had not finished this step" in why_not_offered(client._stack, "k-c", at=NOW)


def test_zw_cache_list_and_gc_dry_run_print_one_line_per_entry_and_a_total(
    rows: Rows, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from zenml_workers.cli import cli
    from zenml_workers.cli.cache import size_text

    assert rows.objects is not None
    monkeypatch.setenv("ZW_HOME", str(client._stack.settings.home))
    monkeypatch.setenv("ZW_METADATA_URL", rows.store.url)
    monkeypatch.setenv("ZW_ARTIFACT_URI", rows.objects.root_uri)
    old = rows.run(user="alice", ended_at=NOW - 40 * DAY)
    entry, _ = rows.step(
        old,
        "load",
        key="sha256:abcdef0123456789",
        ended_at=NOW - 40 * DAY,
        outputs={"df": b"x" * 2048},
    )
    rows.step(
        rows.run(user="bob", ended_at=NOW - DAY),
        "load",
        key=None,
        ended_at=NOW - DAY,
        cached_from=entry,
    )
    listing = CliRunner().invoke(cli, ["cache", "list", "--step", "load"])
    assert listing.exit_code == 0, listing.output
    [line] = [ln for ln in listing.output.splitlines() if "abcdef012345" in ln]
    assert re.search(
        rf"abcdef012345\s+training\s+load\s+2.0 KiB\s+{old[:8]}\s+alice\s+1\s+\d{{4}}-.*never", line
    )
    assert "1 entry, 2.0 KiB" in listing.output
    dry = CliRunner().invoke(cli, ["gc", "--older-than", "0s", "--dry-run"])
    assert dry.exit_code == 0 and "would delete 1 artifact (2.0 KiB)" in dry.output, dry.output
    assert CliRunner().invoke(cli, ["gc"]).exit_code == 2  # neither --older-than nor --check
    assert (size_text(512), size_text(1536), size_text(5 * 2**30)) == (
        "512 B",
        "1.5 KiB",
        "5.0 GiB",
    )


def test_gc_keeps_what_a_run_links_while_it_deletes_and_retries_past_the_foreign_key(
    rows: Rows, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zenml_workers.sdk.cache_admin as admin

    assert rows.objects is not None
    old = rows.run(ended_at=NOW - 40 * DAY)
    entry, linked = rows.step(old, "load", key="k1", ended_at=NOW - 40 * DAY, outputs={"df": b"d"})
    _, unused = rows.step(old, "extra", key="k2", ended_at=NOW - 40 * DAY, outputs={"r": b"r"})
    # While gc settles, a run being planned links `load` as a cache hit; then the first
    # re-check misses it (as a PostgreSQL one would miss an uncommitted link).
    monkeypatch.setattr(
        admin.time,
        "sleep",
        lambda _s: rows.step(
            rows.run(ended_at=None), "load", key="k1", ended_at=None, cached_from=entry
        ),
    )
    real_find, listed, rechecks = mc.find_garbage, [], []

    def find(s: Any, *, before: float, among: Any = None) -> list[mc.GarbageArtifact]:
        if among is None:
            listed[:] = real_find(s, before=before)
            return list(listed)
        rechecks.append(among)
        if len(rechecks) == 1:
            return list(listed)  # a stale re-check: the delete must fail on the foreign key
        return real_find(s, before=before, among=among)

    monkeypatch.setattr(mc, "find_garbage", find)
    report = client.gc("30d", now=NOW, settle_s=0.01)
    assert (report.artifacts, report.in_use, len(rechecks)) == (1, 1, 2)
    assert set(rows.objects.objects) == {linked["df"]}
    with rows.store.read() as s:
        assert (
            s.get(ArtifactRow, linked["df"]) is not None and s.get(ArtifactRow, unused["r"]) is None
        )
