"""Single-flight across teammates: identical steps submitted at the same moment compute once,
and a waiting step takes over when the one it waited for fails or its run is cancelled."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.services.process import wait_until
from tests.team.conftest import Team
from zenml_workers import Client

pytestmark = pytest.mark.services

#: Submits ``runs`` runs of ``pipeline`` once ``go`` exists, waits for them and prints each
#: run's status, creation time and steps as JSON.
_SUBMIT = """
import json, sys, time
from pathlib import Path
from tests.pipelines import flights as pl
from zenml_workers import submit

args = json.loads(sys.argv[1] if len(sys.argv) > 1 else {args!r})
root = Path(args["root"])
(root / f"ready-{{args['who']}}").touch()
while not (root / "go").exists():
    time.sleep(0.01)
pipe = getattr(pl, args["pipeline"])
handles = [submit(pipe, **args["params"]) for _ in range(args["runs"])]
(root / f"planned-{{args['who']}}").write_text(json.dumps([h.id for h in handles]))
out = []
for h in handles:
    run = h.wait(timeout_s=90, progress=False, raise_on_failure=False)
    out.append({{
        "id": run.id, "status": run.status, "user": run.user, "created_at": run.created_at,
        "steps": {{
            inv: {{
                "status": st.status, "from": st.cached_from_run_id, "ended_at": st.ended_at,
                "attempt": st.attempt,
                "outputs": {{n: a.id for n, a in st.outputs.items()}},
                "value": st.outputs[next(iter(st.outputs))].load() if st.status in ("completed", "cached") else None,
            }}
            for inv, st in run.steps.items()
        }},
    }})
print(json.dumps(out))
"""


def _script(**args: Any) -> str:
    return _SUBMIT.format(args=json.dumps(args))


def _counts(root: Path) -> Counter[str]:
    return Counter(
        {p.stem: len(p.read_text().splitlines()) for p in root.glob("*.log") if p.read_text()}
    )


def _together(team: Team, root: Path, jobs: list[tuple[str, str]]) -> list[Any]:
    """Run ``(user, script)`` jobs at once: each waits at the barrier until all are ready."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(team.run_as, user, script) for user, script in jobs]
        wait_until(
            lambda: len(list(root.glob("ready-*"))) == len(jobs) or any(f.done() for f in futures),
            60,
            "every teammate ready at the barrier",
        )
        (root / "go").touch()
        return [team.last_json(f.result()) for f in futures]


def test_single_flight_concurrent_teammates_and_a_storm_compute_each_step_once(
    team: Team, tmp_path: Path
) -> None:
    pair = tmp_path / "pair"
    pair.mkdir()
    params = {"marker_dir": str(pair), "salt": uuid.uuid4().hex, "hold_s": 1.0}
    alice, bob = _together(
        team,
        pair,
        [
            (who, _script(root=str(pair), who=who, pipeline="shared", params=params, runs=1))
            for who in ("alice", "bob")
        ],
    )
    runs = alice + bob

    assert _counts(pair) == {"load": 1, "prep": 1, "train": 1}
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert {r["user"] for r in runs} == {"alice", "bob"}
    for inv in ("load", "prep", "train"):
        owner, waiter = sorted(runs, key=lambda r: r["steps"][inv]["from"] is not None)
        mine, theirs = owner["steps"][inv], waiter["steps"][inv]
        assert mine["from"] is None and mine["status"] == "completed"
        assert theirs["status"] == "cached" and theirs["from"] == owner["id"]
        assert mine["outputs"] == theirs["outputs"]  # one artifact, linked into both runs
        assert mine["value"] == theirs["value"]
    # The cached load was planned while its owner still computed: single-flight, not a
    # plain cache hit of a finished step.
    loads = {r["id"]: r["steps"]["load"] for r in runs}
    waiting_run = next(r for r in runs if r["steps"]["load"]["from"] is not None)
    owner_load = loads[waiting_run["steps"]["load"]["from"]]
    assert waiting_run["created_at"] < owner_load["ended_at"]
    assert runs[0]["steps"]["train"]["value"] == 2 * (1 + 2 + 3 + 32)

    storm = tmp_path / "storm"
    storm.mkdir()
    params = {"marker_dir": str(storm), "salt": uuid.uuid4().hex}
    results = _together(
        team,
        storm,
        [
            (
                user,
                _script(
                    root=str(storm), who=f"{user}{i}", pipeline="shared", params=params, runs=5
                ),
            )
            for i, user in enumerate(("alice", "bob", "carol", "dave"))
        ],
    )
    storm_runs = [r for rs in results for r in rs]

    assert len(storm_runs) == 20
    assert {r["status"] for r in storm_runs} == {"completed"}
    assert _counts(storm) == {"load": 1, "prep": 1, "train": 1}
    assert len({r["steps"]["train"]["outputs"]["model"] for r in storm_runs}) == 1


@pytest.mark.parametrize("owner_ends", ["fails", "cancelled"])
def test_single_flight_a_waiter_takes_over_when_the_owner_ends_without_outputs(
    team: Team, tmp_path: Path, owner_ends: str
) -> None:
    params = {"marker_dir": str(tmp_path), "salt": uuid.uuid4().hex}
    if owner_ends == "fails":
        (tmp_path / "fail-once").touch()  # alice's attempt fails, with no retries
    pool = ThreadPoolExecutor(2)
    (tmp_path / "go").touch()
    alice_job = pool.submit(
        team.run_as,
        "alice",
        _script(root=str(tmp_path), who="alice", pipeline="gate", params=params, runs=1),
    )
    wait_until(lambda: (tmp_path / "started-0").exists(), 60, "alice's gated step running")
    bob_job = pool.submit(
        team.run_as,
        "bob",
        _script(root=str(tmp_path), who="bob", pipeline="gate", params=params, runs=1),
    )
    wait_until(lambda: (tmp_path / "planned-bob").exists(), 60, "bob's run planned")
    # Bob's step does not compute while alice's runs: it waits for it.
    [bob_id] = json.loads((tmp_path / "planned-bob").read_text())
    watcher = Client(team.settings("bob"))
    wait_until(
        lambda: watcher.get_run(bob_id).steps["gated"].status == "waiting",
        60,
        "bob's gated step waiting for alice's (same cache key)",
    )
    if owner_ends == "cancelled":
        [alice_id] = json.loads((tmp_path / "planned-alice").read_text())
        team.zw("alice", "cancel", alice_id)
    (tmp_path / "release").touch()
    [alice] = team.last_json(alice_job.result())
    [bob] = team.last_json(bob_job.result())
    pool.shutdown()

    assert alice["status"] == ("failed" if owner_ends == "fails" else "cancelled")
    assert bob["status"] == "completed"
    gated = bob["steps"]["gated"]
    assert gated["status"] == "completed" and gated["from"] is None and gated["attempt"] == 1
    assert _counts(tmp_path)["gated"] == 2  # alice's attempt, then bob's takeover
    assert bob["steps"]["train"]["value"] == 2 * 32
