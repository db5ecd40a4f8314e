"""Shared stacks on the team's services: alice registers and shares a stack whose secrets are
references, bob uses it from his own home with only the metadata store's URL and his own
values, exports and imports keep secrets out, and private stacks stay private."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services.process import TEST_SECRET_KEY, service_env
from tests.team.conftest import Team

pytestmark = pytest.mark.services


def _zw(team: Team, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``zw ARGS`` in a shell that has exactly ``env`` of the ``ZW_*`` and stack variables."""
    return subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", *args],
        cwd=team.root,
        env=service_env(env, drop_prefixes=("ZW_",)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args[3:]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _stack_rows(team: Team) -> dict[str, str]:
    """Each stored record's name and its components as JSON text, read straight from SQL."""
    from sqlalchemy import select

    from stores.metadata.models import StackRow
    from stores.metadata.store import MetadataStore

    store = MetadataStore(team.env["ZW_METADATA_URL"])
    try:
        with store.read() as s:
            rows = s.execute(select(StackRow.name, StackRow.components)).all()
    finally:
        store.dispose()
    return {name: json.dumps(components) for name, components in rows}


def test_a_shared_stack_is_used_by_a_teammate_with_their_own_secrets(
    team: Team, tmp_path: Path
) -> None:
    env = team.env
    secrets = [env["ZW_S3_ACCESS_KEY_ID"], env["ZW_S3_SECRET_ACCESS_KEY"], TEST_SECRET_KEY]
    # Each teammate's shell: where the team's store is, who they are, and their own values.
    alice = {"ZW_METADATA_URL": env["ZW_METADATA_URL"], "ZW_HOME": str(team.home("alice"))}
    alice["ZW_USER"] = "alice"
    bob = {**alice, "ZW_HOME": str(team.home("bob")), "ZW_USER": "bob"}
    own = {
        "TEAM_S3_KEY": env["ZW_S3_ACCESS_KEY_ID"],
        "TEAM_S3_SECRET": env["ZW_S3_SECRET_ACCESS_KEY"],
        "TEAM_SIGNING_KEY": TEST_SECRET_KEY,
    }

    # alice registers the team's stack from flags, secrets as variable names only, and shares it.
    _ok(
        _zw(
            team,
            alice,
            "stack", "register", "team",
            "--orchestrator", "celery", "--broker-url", env["ZW_BROKER_URL"],
            "--queues", "cpu,gpu", "--artifact-uri", env["ZW_ARTIFACT_URI"],
            "--s3-endpoint-url", env["ZW_S3_ENDPOINT_URL"], "--s3-region", env["ZW_S3_REGION"],
            "--s3-access-key-id-env", "TEAM_S3_KEY",
            "--s3-secret-access-key-env", "TEAM_S3_SECRET",
            "--secret-key-env", "TEAM_SIGNING_KEY",
            "--description", "the team's cluster",
        )
    )  # fmt: skip
    _ok(_zw(team, alice, "stack", "register", "alice-scratch", "--artifact-uri", "/tmp/alice"))
    assert "shared" in _ok(_zw(team, alice, "stack", "share", "team"))

    # A literal secret is refused in one sentence naming the flag to use, and nothing is written.
    leak = _zw(
        team, alice, "stack", "register", "leak", "--broker-url", "redis://:hunter2@127.0.0.1/0"
    )
    assert leak.returncode == 1 and "--broker-password-env" in leak.stderr
    assert "hunter2" not in leak.stderr + leak.stdout
    stored = _stack_rows(team)
    assert sorted(stored) == ["alice-scratch", "team"]
    assert '"TEAM_S3_SECRET"' in stored["team"]
    assert not [s for s in secrets if s in "".join(stored.values())]

    # bob sees the shared stack, not alice's private one, and every setting of it.
    listed = _ok(_zw(team, bob, "stack", "list"))
    assert "team" in listed and "alice" in listed and "shared" in listed
    assert "alice-scratch" not in listed
    hidden = _zw(team, bob, "stack", "describe", "alice-scratch")
    assert hidden.returncode == 1 and "no stack 'alice-scratch'" in hidden.stderr
    described = _ok(_zw(team, bob, "stack", "describe", "team"))
    for text in (env["ZW_S3_ENDPOINT_URL"], env["ZW_S3_REGION"], "cpu, gpu", "$TEAM_S3_SECRET"):
        assert text in described
    refused = _zw(team, bob, "stack", "delete", "team")
    assert refused.returncode == 1 and "only alice can delete" in refused.stderr

    # bob makes it his active stack; without his own S3 secret it says which one is missing.
    _ok(_zw(team, bob, "stack", "set", "team"))
    missing = _zw(team, {**bob, **own, "TEAM_S3_SECRET": ""}, "stack")
    assert missing.returncode == 1
    assert "'team'" in missing.stderr and "artifact store" in missing.stderr
    assert "TEAM_S3_SECRET" in missing.stderr
    shown = _ok(_zw(team, {**bob, **own}, "stack"))
    assert "stack: team" in shown and f"s3_region: {env['ZW_S3_REGION']}" in shown
    assert not [s for s in secrets if s in shown]

    # bob's own process, no ZW_BROKER_URL / ZW_ARTIFACT_URI: the run executes on the workers.
    proc = team.run_as(
        "bob",
        """
        import json
        from tests.pipelines import cluster as pl
        from zenml_workers import Client, submit
        run = submit(pl.routed, x=41).wait(timeout_s=60, progress=False)
        client = Client()
        print(json.dumps({
            "status": run.status, "user": run.user, "fit": run.steps["fit"].worker_host,
            "stack": run.config["stack"]["stack"], "id": run.id,
            "bobs": [r.id for r in client.list_runs(user="bob")],
            "users": sorted({r.user for r in client.list_runs(user="bob")}),
            "alices": [r.id for r in client.list_runs(user="alice")],
        }))
        """,
        drop=tuple(k for k in env if k != "ZW_METADATA_URL"),
        env=own,
    )
    result = team.last_json(proc)
    assert result["status"] == "completed" and result["user"] == "bob"
    assert result["fit"] == "gpu@team" and result["stack"] == "team"
    assert result["id"] in result["bobs"] and result["users"] == ["bob"]
    assert result["id"] not in result["alices"]
    runs = _ok(_zw(team, {**bob, **own}, "runs", "--user", "bob"))
    assert result["id"][:8] in runs

    # Export holds references only; importing it under another name gives an equal stack.
    exported = _ok(_zw(team, alice, "stack", "export", "team"))
    assert "TEAM_S3_SECRET" in exported and env["ZW_S3_ENDPOINT_URL"] in exported
    assert not [s for s in secrets if s in exported]
    path = tmp_path / "team-stack.toml"
    path.write_text(exported)
    _ok(_zw(team, bob, "stack", "import", str(path), "--name", "team-bob"))
    copy = _ok(_zw(team, bob, "stack", "describe", "team-bob"))
    assert "owner: bob" in copy and "private" in copy
    assert copy.split("orchestrator:", 1)[1] == described.split("orchestrator:", 1)[1]
    assert "team-bob" not in _ok(_zw(team, alice, "stack", "list"))
