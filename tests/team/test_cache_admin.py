"""Managing the team's shared cache on real services (PostgreSQL, SeaweedFS, Redis, workers):
listing and clearing entries, ``cache_expires_after``, ``zw gc`` under a concurrent run, and
``zw gc --check`` finding an object deleted behind the store's back."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest

from tests.services.process import settings_from_env, wait_until
from tests.team.conftest import Team

pytestmark = pytest.mark.services

STATUSES = """
import json, sys
from tests.pipelines import cache_admin as pl
from zenml_workers import submit

def statuses(run):
    return {name: st.status for name, st in run.steps.items()}
"""


def _settings(team: Team, user: str) -> Any:
    # Team.settings passes the workers' ZW_SKIP_GPU_CHECK, which client settings refuse.
    return settings_from_env(team.user_env(user), exclude=("ZW_SKIP_GPU_CHECK",))


def _client(team: Team, user: str) -> Any:
    from zenml_workers.sdk.client import Client

    return Client(_settings(team, user))


def _row(listing: str, step: str) -> str:
    [line] = [ln for ln in listing.splitlines() if re.search(rf"\s{step}\s", ln)]
    return line


def test_teammates_list_clear_and_expire_cache_entries(team: Team) -> None:
    n = random.randrange(10**6, 10**7)  # no other test's entries share these keys
    alice = team.run_as(
        "alice",
        STATUSES
        + f"""
run = submit(pl.team_cache, n={n}).wait(timeout_s=60, progress=False)
print(json.dumps({{"id": run.id, "steps": statuses(run)}}))
""",
    )
    a_run = team.last_json(alice)
    assert set(a_run["steps"].values()) == {"completed"}

    # Bob's identical run reuses all three; then he clears `train` and runs again; then the
    # expiring step is a hit only until its half second has passed.
    bob = team.run_as(
        "bob",
        STATUSES
        + f"""
first = submit(pl.team_cache, n={n}).wait(timeout_s=60, progress=False)
print(json.dumps({{"steps": statuses(first)}}))
""",
    )
    assert set(team.last_json(bob)["steps"].values()) == {"cached"}

    listing = team.zw("bob", "cache", "list", "--pipeline", "team_cache").stdout
    for step in ("load", "prep", "train"):
        row = _row(listing, step)
        # key, pipeline, step, size, producing run, its user, hits, last used, expires
        assert re.search(
            rf"team_cache\s+{step}\s+\d+ B\s+{a_run['id'][:8]}\s+alice\s+1\s+\d{{4}}-", row
        ), row
        assert row.rstrip().endswith("never")
    mine = [
        e for e in _client(team, "bob").list_cache(pipeline="team_cache") if e.run_id == a_run["id"]
    ]
    assert {e.step: (e.user, e.hits, e.outputs) for e in mine} == {
        s: ("alice", 1, 1) for s in ("load", "prep", "train")
    }
    assert all(e.size_bytes > 0 and e.last_used_at is not None for e in mine)

    cleared = team.zw("bob", "cache", "clear", "--run", a_run["id"][:8], "--step", "train")
    assert cleared.stdout.strip() == "cleared 1 cache entry"

    bob2 = team.run_as(
        "bob",
        STATUSES
        + f"""
from zenml_workers import Client
from tests.services.process import wait_until
again = submit(pl.team_cache, n={n}).wait(timeout_s=60, progress=False)
explained = Client().explain_cache(again, "train")
first = submit(pl.expiring, n={n}).wait(timeout_s=60, progress=False)
[entry] = [e for e in Client().list_cache(pipeline="expiring") if e.run_id == first.id]
# The entry stops being offered half a second after it was committed.
wait_until(lambda: not any(e.run_id == first.id for e in Client().list_cache(pipeline="expiring")),
           10, "the expiring entry to expire")
second = submit(pl.expiring, n={n}).wait(timeout_s=60, progress=False)
print(json.dumps({{"again": statuses(again), "explained": explained,
                  "expiry_s": entry.expires_at - entry.created_at,
                  "first": statuses(first), "second": statuses(second)}}))
""",
    )
    out = team.last_json(bob2)
    assert out["again"] == {"load": "cached", "prep": "cached", "train": "completed"}
    assert "cleared" in " ".join(out["explained"]), out["explained"]
    assert out["expiry_s"] == pytest.approx(0.5)
    assert (out["first"], out["second"]) == ({"stamp": "completed"}, {"stamp": "completed"})


def test_gc_under_a_concurrent_run_and_gc_check_after_an_object_is_deleted(
    team: Team, tmp_path: Path
) -> None:
    from zenml_workers.sdk.stack import get_stack

    n = random.randrange(10**6, 10**7)
    old = team.last_json(
        team.run_as(
            "alice",
            STATUSES
            + f"""
run = submit(pl.producing, n={n}).wait(timeout_s=60, progress=False)
print(json.dumps({{"id": run.id, "outputs": {{s: st.output.uri for s, st in run.steps.items()}}}}))
""",
        )
    )
    # Bob's run reuses the old run's load and prep, holds a step, and leaves `use` pending.
    markers = tmp_path / "markers"
    markers.mkdir()
    bob = team.run_as(
        "bob",
        STATUSES
        + f"""
handle = submit(pl.consuming, n={n}, marker_dir={str(markers)!r})
print(json.dumps({{"id": handle.id}}))
""",
    )
    running_id = team.last_json(bob)["id"]
    wait_until(lambda: (markers / "started").exists(), 60, "bob's held step to start")
    client, artifacts = _client(team, "ops"), get_stack(_settings(team, "ops")).artifacts
    assert all(artifacts.exists(uri) for uri in old["outputs"].values())

    dry = team.zw("ops", "gc", "--older-than", "0s", "--dry-run").stdout
    assert re.search(r"would delete [1-9]\d* artifacts? .* \(dry run\)", dry), dry
    assert all(artifacts.exists(uri) for uri in old["outputs"].values())

    # Everything not referenced by a running run goes: the old run's `extra`, not what Bob reads.
    done = team.zw("ops", "gc", "--older-than", "0s").stdout
    assert re.search(r"deleted [1-9]\d* artifacts?", done), done
    assert not artifacts.exists(old["outputs"]["extra"])
    assert artifacts.exists(old["outputs"]["load"]) and artifacts.exists(old["outputs"]["prep"])
    (markers / "release").write_text("go")
    wait_until(lambda: client.get_run(running_id).status != "running", 60, "bob's run to end")
    run = client.get_run(running_id)
    assert run.status == "completed", run.message
    assert {s: st.status for s, st in run.steps.items()} == {
        "load": "cached",
        "prep": "cached",
        "hold": "completed",
        "use": "completed",
    }
    assert run.steps["use"].output.load() == 2 * (3 * n + 3) + 3
    live = {e.step for e in client.list_cache(pipeline="producing") if e.run_id == old["id"]}
    assert live == {"load", "prep"}  # extra's entry went with its artifact

    # The load object vanishes behind the store's back: the check reports it and the next run
    # computes load again (prep's input is byte-identical, so prep is still a hit).
    artifacts.delete(old["outputs"]["load"])
    check = team.zw("ops", "gc", "--check").stdout
    assert re.search(rf"missing: artifact \w+ 'data' of run {old['id'][:8]}", check), check
    assert re.search(r"checked \d+ artifacts: [1-9]\d* missing", check), check
    again = team.last_json(
        team.run_as(
            "bob",
            STATUSES
            + f"""
run = submit(pl.consuming, n={n}, marker_dir={str(markers)!r}).wait(timeout_s=60, progress=False)
print(json.dumps(statuses(run)))
""",
        )
    )
    assert again == {"load": "completed", "prep": "cached", "hold": "completed", "use": "completed"}
