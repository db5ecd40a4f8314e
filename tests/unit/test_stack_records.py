"""Unit tests for stack records: components and their refusal rules, secret references, the
TOML round trip, the Client's record operations on SQLite, and how ``load_settings`` applies
the active record."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stores.metadata.store import MetadataStore
from zenml_workers.errors import ConfigurationError, NotFoundError, StackRecordError
from zenml_workers.sdk.client import Client
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.sdk.stack_components import SecretRef, check_components, components_from_options
from zenml_workers.sdk.stack_toml import parse_toml
from zenml_workers.sdk.stacks import ACTIVE_STACK_FILE, forget_records
from zenml_workers.settings import load_settings

TEAM = {
    "orchestrator": "celery",
    "broker_url": "redis://redis.internal:6379/0",
    "broker_password_env": "REDIS_PASSWORD",
    "queues": ["cpu", "gpu"],
    "artifact_uri": "s3://team/zw",
    "s3_endpoint_url": "http://s3.internal:8333",
    "s3_region": "eu-west-1",
    "s3_access_key_id_env": "TEAM_S3_KEY",
    "s3_secret_access_key_env": "TEAM_S3_SECRET",
    "secret_key_env": "TEAM_SIGNING_KEY",
    "mlflow_tracking_uri": "http://mlflow.internal:5000",
}
MINE = {"REDIS_PASSWORD": "r3dis/pw@", "TEAM_S3_KEY": "AKIA-bob", "TEAM_S3_SECRET": "s3-bob"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("ZW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    forget_records()
    yield
    forget_records()
    close_stacks()


def _one_sentence(text: str) -> bool:
    return re.search(r"[.!?]\s", text.strip()) is None


def _as(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, user: str) -> Client:
    """``user``'s client: their own home, the shared SQLite store, no active record applied."""
    monkeypatch.setenv("ZW_USER", user)
    monkeypatch.setenv("ZW_HOME", str(tmp_path / user))
    monkeypatch.setenv("ZW_METADATA_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    return Client(load_settings(apply_active_stack=False))


# -- components and the refusal rules ---------------------------------------------------------


def test_components_from_options_keep_secrets_as_references_only() -> None:
    components = components_from_options(**TEAM)

    assert components["orchestrator"] == {
        "flavor": "celery",
        "broker_url": "redis://redis.internal:6379/0",
        "broker_password": {"env": "REDIS_PASSWORD"},
        "queues": ["cpu", "gpu"],
    }
    assert components["artifact_store"]["s3_secret_access_key"] == {"env": "TEAM_S3_SECRET"}
    assert components["signing"] == {"secret_key": {"env": "TEAM_SIGNING_KEY"}}
    assert components["experiment_tracker"]["flavor"] == "mlflow"
    assert components_from_options()["orchestrator"] == {"flavor": "embedded"}


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"broker_url": "redis://:hunter2@h:6379/0"}, "--broker-password-env"),
        ({"broker_url": "redis://h:6379/0?password=hunter2"}, "--broker-password-env"),
        ({"metadata_url": "postgresql://zw:hunter2@db/zw"}, "--metadata-password-env"),
        ({"secret_key_env": "hunter2-is-the-key!"}, "--secret-key-env"),
        ({"secret_key_env": "K", "secret_key_file": "/k"}, "--secret-key-file"),
        ({"secret_key_file": "relative/key"}, "absolute"),
        ({"orchestrator": "celery"}, "--broker-url"),
        ({"orchestrator": "embedded", "broker_url": "redis://h/0"}, "embedded"),
        ({"artifact_uri": "/data/zw", "s3_region": "x"}, "s3://"),
        ({"broker_password": "hunter2"}, "broker_password"),
    ],
)
def test_bad_options_are_refused_in_one_sentence(options: dict[str, Any], names: str) -> None:
    with pytest.raises(StackRecordError) as e:
        components_from_options(**options)

    message = str(e.value)
    assert names in message and "nothing was written" in message
    assert "hunter2" not in message and _one_sentence(message)


@pytest.mark.parametrize(
    ("components", "names"),
    [
        ({"artifact_store": {"uri": "s3://b", "s3_secret_access_key": "hunter2"}}, "--s3-secret"),
        ({"signing": {"secret_key": "hunter2"}}, "secret_key = { env"),
        ({"signing": {"secret_key": {"value": "hunter2"}}}, "NAME of an environment variable"),
        ({"step_operator": {}}, "orchestrator, metadata_store"),
        ({"orchestrator": {"flavor": "celery", "broker": "x"}}, "broker_url"),
        ({"settings": {"insecure": True}}, "insecure"),
        ({"settings": {"secret_key": "hunter2"}}, "secret_key"),
        ({"settings": {"lease_s": "long"}}, "lease_s"),
    ],
)
def test_literal_secrets_and_unknown_keys_in_components_are_refused(
    components: dict[str, Any], names: str
) -> None:
    with pytest.raises(StackRecordError) as e:
        check_components(components)

    assert names in str(e.value) and "hunter2" not in str(e.value)


# -- references -------------------------------------------------------------------------------


def test_a_reference_resolves_from_this_users_environment_or_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TEAM_S3_SECRET", "mine")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")

    assert SecretRef(env="TEAM_S3_SECRET").resolve(stack="team", label="x") == "mine"
    assert SecretRef(file=str(key_file)).resolve(stack="team", label="x") == "from-file"
    assert SecretRef(env="V").display() == "$V"
    assert SecretRef(file="/k").display() == "file:/k"


def test_an_unset_variable_names_the_stack_the_component_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client = _as(monkeypatch, tmp_path, "alice")
    record = client.register_stack("team", **TEAM)
    for name, value in MINE.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(ConfigurationError) as e:
        record.settings_values()

    message = str(e.value)
    assert "'team'" in message and "TEAM_SIGNING_KEY" in message and _one_sentence(message)
    assert "signing key" in message
    # A setting given elsewhere (here: skipped) is not read from the record at all.
    values = record.settings_values(skip={"secret_key"})
    assert values["broker_url"] == "redis://:r3dis%2Fpw%40@redis.internal:6379/0"
    assert values["s3_access_key_id"] == "AKIA-bob" and values["stack_name"] == "team"
    assert "secret_key" not in values


# -- TOML -------------------------------------------------------------------------------------


def test_export_and_import_round_trip_without_any_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in {**MINE, "TEAM_SIGNING_KEY": "sig-key"}.items():
        monkeypatch.setenv(name, value)
    client = _as(monkeypatch, tmp_path, "alice")
    record = client.register_stack("team", description='say "hi"\n', **TEAM)

    text = client.export_stack("team")

    assert not [v for v in [*MINE.values(), "sig-key"] if v in text]
    assert tomllib.loads(text)["artifact_store"]["s3_region"] == "eu-west-1"
    doc = parse_toml(text, source="export")
    assert doc.name == "team" and doc.description == 'say "hi"\n'
    assert doc.components == {k: dict(v) for k, v in record.components.items()}
    copy = client.import_stack(text, name="team-copy")
    assert copy.components == record.components and copy.owner == "alice"


def test_a_settings_stack_file_imports_and_its_literal_secrets_are_refused() -> None:
    doc = parse_toml(
        '[stack]\nstack_name = "ml-team"\nbroker_url = "redis://r:6379/0"\n'
        'queues = ["cpu"]\nmax_queued_per_run = 8\nsecret_key_file = "/etc/zw/key"\n',
        source="team-stack.toml",
    )

    assert doc.name == "ml-team"
    assert doc.components["orchestrator"]["flavor"] == "celery"
    assert doc.components["signing"] == {"secret_key": {"file": "/etc/zw/key"}}
    assert doc.components["settings"] == {"max_queued_per_run": 8}
    with pytest.raises(StackRecordError, match="literal value") as e:
        parse_toml('s3_secret_access_key = "hunter2"\n', source="f.toml")
    assert "hunter2" not in str(e.value)


# -- records in the store ---------------------------------------------------------------------


def test_private_stacks_are_their_owners_and_sharing_is_the_owners_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    alice = _as(monkeypatch, tmp_path, "alice")
    alice.register_stack("team", **TEAM)
    alice.register_stack("scratch", artifact_uri="/tmp/alice")
    bob = _as(monkeypatch, tmp_path, "bob")

    assert bob.list_stacks() == []
    with pytest.raises(NotFoundError):
        bob.get_stack("scratch")
    with pytest.raises(NotFoundError):
        bob.set_active_stack("team")
    with pytest.raises(StackRecordError, match="pick another name"):
        bob.register_stack("scratch")

    _as(monkeypatch, tmp_path, "alice").share_stack("team")
    bob = _as(monkeypatch, tmp_path, "bob")
    assert [(r.name, r.owner, r.shared) for r in bob.list_stacks()] == [("team", "alice", True)]
    with pytest.raises(StackRecordError, match="only alice can share") as e:
        bob.share_stack("team")
    assert _one_sentence(str(e.value))
    with pytest.raises(StackRecordError, match="only alice can delete"):
        bob.delete_stack("team")
    assert dict(bob.get_stack("team").describe())["  s3_secret_access_key"] == "$TEAM_S3_SECRET"


def test_a_refused_registration_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    alice = _as(monkeypatch, tmp_path, "alice")

    with pytest.raises(StackRecordError):
        alice.register_stack("team", broker_url="redis://:hunter2@h:6379/0")
    with pytest.raises(StackRecordError):
        alice.import_stack('[signing]\nsecret_key = "hunter2"\n', name="team")
    with pytest.raises(StackRecordError):
        alice.register_stack("default")

    assert alice.list_stacks() == []


# -- the active record in load_settings -------------------------------------------------------


def test_the_active_record_applies_below_the_users_own_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _as(monkeypatch, tmp_path, "alice").register_stack("team", share=True, **TEAM)
    bob = _as(monkeypatch, tmp_path, "bob")
    bob.set_active_stack("team")
    for name, value in {**MINE, "TEAM_SIGNING_KEY": "sig-key"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ZW_S3_REGION", "bobs-region")

    settings = load_settings(queues="gpu")

    assert (tmp_path / "bob" / ACTIVE_STACK_FILE).read_text().strip() == "team"
    assert settings.stack_name == "team" and settings.describe()["stack"] == "team"
    assert settings.reveal_broker_url() == "redis://:r3dis%2Fpw%40@redis.internal:6379/0"
    assert settings.artifact_uri == "s3://team/zw" and settings.s3_access_key_id == "AKIA-bob"
    assert settings.signing_keys()[0] == b"sig-key"
    assert settings.s3_region == "bobs-region"  # environment > record
    assert settings.queues == ["gpu"]  # explicit override > record
    assert settings.mlflow_tracking_uri == "http://mlflow.internal:5000"
    assert load_settings(apply_active_stack=False).is_embedded

    monkeypatch.delenv("TEAM_S3_SECRET")
    with pytest.raises(ConfigurationError, match="TEAM_S3_SECRET"):
        load_settings()
    bob.set_active_stack("default")
    assert load_settings().is_embedded


def test_without_an_active_record_load_settings_never_reads_the_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_db(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_settings opened the metadata store")

    monkeypatch.setenv("ZW_HOME", str(tmp_path / "carol"))
    monkeypatch.setattr(MetadataStore, "__init__", no_db)

    assert load_settings().stack_name == "default"


def test_an_active_record_that_is_gone_says_how_to_pick_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    alice = _as(monkeypatch, tmp_path, "alice")
    alice.register_stack("mine", artifact_uri=str(tmp_path / "a"))
    alice.set_active_stack("mine")
    assert load_settings().artifact_uri == str(tmp_path / "a")
    (tmp_path / "alice" / ACTIVE_STACK_FILE).write_text("vanished\n")

    with pytest.raises(ConfigurationError, match="zw stack set") as e:
        load_settings()
    assert _one_sentence(str(e.value)) and "vanished" in str(e.value)


def test_list_runs_filters_by_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from stores.metadata.models import PipelineRow, RunRow

    client = _as(monkeypatch, tmp_path, "alice")
    with client._stack.metadata.transaction() as s:
        s.add(PipelineRow(id="p", name="training", created_at=0.0))
        for i, user in enumerate(["alice", "bob", "alice"]):
            s.add(
                RunRow(
                    id=f"r{i}",
                    pipeline_id="p",
                    pipeline_name="training",
                    name=f"r{i}",
                    status="completed",
                    spec="{}",
                    user=user,
                    created_at=float(i),
                )
            )

    with client._stack.metadata.read() as s:
        from stores.metadata import queries as q

        assert [r.id for r in q.list_runs(s, user="alice")] == ["r2", "r0"]
        assert [r.id for r in q.list_runs(s, user="bob", pipeline="training")] == ["r1"]
        assert q.list_runs(s, user="carol") == []
