"""Copy a teammate's recorded pipeline with a step swapped; retry, rerun and diff runs.

Alice runs her pipelines from her own git checkout (each script is a module file in it);
Bob's process has neither her folder nor her module on its path, so his copy is built from
the recorded spec and code blobs alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.team.conftest import Team

pytestmark = pytest.mark.services

#: Alice's pipelines, defined in the script that runs them (``__main__``, so the workers get
#: the code by value, as they would from a notebook or a script run on her laptop).
ALICE = """
import json, os, random, sys, time
from typing import Annotated
from zenml_workers import Client, pipeline, step, submit, trainer

@step
def load_data(rows: int) -> Annotated[list, "data"]:
    return list(range(rows))

@step
def preprocess(data: list) -> Annotated[list, "clean"]:
    return [x * 2 for x in data]

@trainer
def train(clean: list, lr: float = 0.1) -> Annotated[float, "model"]:
    return sum(clean) * lr

@step
def evaluate(model: float, clean: list) -> Annotated[float, "score"]:
    return model / len(clean)

@pipeline(name="training")
def training(rows: int = 10, lr: float = 0.1) -> None:
    clean = preprocess(load_data(rows=rows))
    evaluate(train(clean, lr=lr), clean)

@step
def prepare(n: int) -> Annotated[int, "base"]:
    return n + 1{prepare_edit}

@step
def flaky(base: int) -> Annotated[int, "value"]:
    if not os.path.exists({marker!r}):
        raise RuntimeError("the marker file is not there yet")
    return base * 10

@step
def finish(value: int) -> Annotated[int, "result"]:
    return value + 1

@pipeline(name="flaky")
def flaky_pipeline(n: int = 4) -> None:
    finish(flaky(prepare(n=n)))

@step
def noise(seed: int) -> Annotated[float, "sample"]:
    return random.random() + time.time()

@pipeline(name="noisy")
def noisy(seed: int = 1) -> None:
    noise(seed=seed)

def ids(run):
    return {{inv: {{n: a.id for n, a in st.outputs.items()}} for inv, st in run.steps.items()}}
"""

BOB = """
import importlib.util, json, sys
from typing import Annotated
from zenml_workers import Client, step, trainer
from zenml_workers.errors import PipelineDefinitionError

@step
def evaluate_balanced(model: float, clean: list, weight: float = 0.5) -> Annotated[float, "score"]:
    return model * weight / max(1, len(clean))

@step
def evaluate_model_only(model: float) -> Annotated[float, "score"]:
    return model

@trainer
def train_renamed(clean: list, lr: float = 0.1) -> Annotated[float, "weights"]:
    return lr

@trainer
def train_text(clean: list, lr: float = 0.1) -> Annotated[str, "model"]:
    return str(lr)

@trainer
def train_fast(clean: list, lr: float = 0.1) -> Annotated[float, "model"]:
    return sum(clean) * lr * 2

training = Client().get_pipeline("training")
bad = []
for target, wrong in (("evaluate", evaluate_model_only), ("train", train_renamed), ("train", train_text)):
    try:
        training.copy("training_bad", replace={{target: wrong}})
    except PipelineDefinitionError as e:
        bad.append(str(e))
trainer_copy = training.copy("training_c", replace={{"train": train_fast}})
copy = training.copy("training_b", replace={{"evaluate": evaluate_balanced}})
run = copy()
print(json.dumps({{
    "alice_module_visible": any("alice" in p for p in sys.path),
    "bad": bad,
    "trainer_queue": trainer_copy.spec.step("train").queue,
    "run": run.id,
    "pipeline": run.pipeline,
    "origin": dict(run.origin),
    "status": {{inv: st.status for inv, st in run.steps.items()}},
    "cached_from": {{inv: st.cached_from_run_id for inv, st in run.steps.items()}},
    "ids": {{inv: {{n: a.id for n, a in st.outputs.items()}} for inv, st in run.steps.items()}},
    "score": run.steps["evaluate"].output.load(),
}}))
"""


def _alice_repo(team: Team) -> Path:
    repo = team.root / "alice-repo"
    repo.mkdir(exist_ok=True)
    (repo / "README.md").write_text("alice's experiments\n")
    git = ["git", "-C", str(repo), "-c", "user.name=alice", "-c", "user.email=a@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "README.md"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "start"], check=True)
    return repo


def _alice(team: Team, repo: Path, body: str, *, marker: Path, prepare_edit: str = "") -> Any:
    script = ALICE.format(marker=str(marker), prepare_edit=prepare_edit) + body
    return team.last_json(team.run_as("alice", script, cwd=repo))


def test_copy_swap_retry_rerun_and_diff_across_teammates(team: Team) -> None:
    repo = _alice_repo(team)
    marker = team.root / "flaky-marker"
    first = _alice(
        team,
        repo,
        """
train_run = training(rows=10)
failed = submit(flaky_pipeline, n=4).wait(timeout_s=60, progress=False, raise_on_failure=False)
noisy_run = noisy(seed=1)
print(json.dumps({"training": train_run.id, "ids": ids(train_run), "failed": failed.id,
                  "failed_status": {i: s.status for i, s in failed.steps.items()},
                  "noisy": noisy_run.id}))
""",
        marker=marker,
    )
    assert first["failed_status"] == {
        "prepare": "completed",
        "flaky": "failed",
        "finish": "skipped",
    }

    # Bob copies alice's recorded pipeline with evaluate swapped, without her source.
    bob = team.last_json(team.run_as("bob", BOB.format()))
    assert bob["alice_module_visible"] is False
    assert (
        "has no parameter 'clean', which the recorded step receives from step 'preprocess'"
        in bob["bad"][0]
    )
    assert "has no output 'model', which step 'evaluate' reads" in bob["bad"][1]
    assert "returns str as output 'model', but step 'evaluate' reads it as float" in bob["bad"][2]
    assert bob["trainer_queue"] == "gpu"
    assert bob["pipeline"] == "training_b"
    assert bob["origin"] == {
        "kind": "copy",
        "pipeline": "training",
        "run_id": first["training"],
        "replaced": ["evaluate"],
    }
    assert bob["status"] == {
        "load_data": "cached",
        "preprocess": "cached",
        "train": "cached",
        "evaluate": "completed",
    }
    for upstream in ("load_data", "preprocess", "train"):
        assert bob["cached_from"][upstream] == first["training"]
        assert bob["ids"][upstream] == first["ids"][upstream]  # alice's artifacts, no copies
    assert bob["score"] == pytest.approx(9.0 * 0.5 / 10)
    store = _store(team)
    from sqlalchemy import func, select

    from stores.metadata.models import ArtifactRow

    with store.read() as s:
        new_objects = s.execute(
            select(func.count()).where(ArtifactRow.producer_run_id == bob["run"])
        ).scalar_one()
    assert new_objects == 1  # only the new evaluate's score

    # Retry with the recorded code: prepare is reused, flaky and finish run again.
    with pytest.raises(AssertionError, match="failed"):
        team.zw("alice", "retry", first["failed"])  # the marker is not there yet
    marker.write_text("go")
    out = team.zw("alice", "retry", first["failed"]).stdout
    assert f"prepare: reused from run {first['failed']}" in out
    assert f"flaky: failed in run {first['failed']}: runs again" in out
    assert "with the recorded code" in out

    # Retry with the current code, where prepare's code changed.
    current = _alice(
        team,
        repo,
        f"""
result = Client().retry({first["failed"]!r}, pipeline=flaky_pipeline)
run = result.handle.wait(timeout_s=60, progress=False)
print(json.dumps({{"notes": dict(result.steps), "code": result.code, "run": run.id,
                   "origin": dict(run.origin), "status": run.status}}))
""",
        marker=marker,
        prepare_edit="  # v2: same value, edited code",
    )
    assert current["code"] == "current"
    assert current["notes"]["prepare"] == "code changed: runs again"
    assert current["status"] == "completed"
    assert current["origin"]["kind"] == "retry" and current["origin"]["run_id"] == first["failed"]
    completed = team.zw("alice", "retry", current["run"], check=False)
    assert completed.returncode == 1 and "nothing to retry" in completed.stderr

    # Rerun without the cache: the deterministic pipeline matches hash for hash.
    same = team.zw("alice", "rerun", first["training"], "--no-cache", timeout_s=120)
    matched = [
        line.split()[0] for line in same.stdout.splitlines() if line.rstrip().endswith(" match")
    ]
    assert matched == ["load_data", "preprocess", "train", "evaluate"], same.stdout
    assert "every re-executed step's outputs match the original" in same.stdout
    noisy = team.zw("alice", "rerun", first["noisy"], "--no-cache", check=False, timeout_s=120)
    assert noisy.returncode == 1, noisy.stdout + noisy.stderr
    assert "differs: output sample hash" in noisy.stdout and "not reproduced: noise" in noisy.stdout
    cached = team.zw("alice", "rerun", first["noisy"], timeout_s=120)
    assert "cached: not re-executed" in cached.stdout

    # Diff: a code change (bob's evaluate), a parameter change, a package change.
    code = team.zw("bob", "diff", first["training"], bob["run"]).stdout
    assert "step 'evaluate': code changed" in code
    assert "+def evaluate_balanced(" in code and "-def evaluate(" in code
    changed = _alice(
        team, repo, "print(json.dumps({'run': training(rows=10, lr=0.2).id}))", marker=marker
    )
    _edit_packages(store, changed["run"])
    params = team.zw("alice", "diff", first["training"], changed["run"]).stdout
    assert "pipeline parameter lr: 0.1 -> 0.2" in params
    assert "step 'train' parameter lr: 0.1 -> 0.2" in params
    assert "step 'evaluate' input 'model': content hash" in params
    assert "package team-fake-package: added (1.0)" in params
    assert "git commit" not in params and "python: " not in params
    same_run = team.zw("alice", "diff", first["training"], first["training"]).stdout
    assert "do not differ" in same_run
    show = team.zw("bob", "show", bob["run"]).stdout
    assert "copied from pipeline 'training'" in show and "replacing evaluate" in show
    store.dispose()


def _store(team: Team) -> Any:
    from stores.metadata.store import MetadataStore

    return MetadataStore(team.env["ZW_METADATA_URL"])


def _edit_packages(store: Any, run_id: str) -> None:
    """Fake a package change: the run's recorded environment gains a package."""
    from stores.metadata.models import RunRow

    with store.transaction() as s:
        row = s.get(RunRow, run_id)
        env = json.loads(json.dumps(row.environment))
        env["packages"]["team-fake-package"] = "1.0"
        row.environment = env
