"""Unit tests for ``zenml_workers.settings``: ``ZW_*`` variables, stack files, precedence, errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from zenml_workers.errors import ConfigurationError, ZenMLWorkersError
from zenml_workers.settings import Settings, load_settings, read_stack_file


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ``ZW_*`` variable from the outer environment leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("ZW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _one_sentence(text: str) -> bool:
    return re.search(r"[.!?]\s", text.strip()) is None


def _write(tmp_path: Path, text: str, name: str = "stack.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- defaults and the environment -------------------------------------------------------------


def test_defaults_are_the_embedded_stack_under_home(tmp_path: Path) -> None:
    settings = load_settings()

    assert settings.is_embedded
    assert settings.home == tmp_path / "home" / ".zenml-workers"
    assert settings.queues == ["cpu", "gpu"]
    assert (
        settings.resolved_metadata_url() == f"sqlite:///{settings.home.resolve() / 'metadata.db'}"
    )
    assert settings.resolved_artifact_uri() == str(settings.home.resolve() / "artifacts")
    assert settings.describe()["orchestrator"] == "local"


def test_env_prefix_zw_sets_each_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZW_HOME", str(tmp_path / "zw"))
    monkeypatch.setenv("ZW_BROKER_URL", "redis://localhost:6379/0")
    monkeypatch.setenv("ZW_METADATA_URL", "postgresql+psycopg://zw:secret@db:5432/zw")
    monkeypatch.setenv("ZW_ARTIFACT_URI", "s3://bucket/artifacts")
    monkeypatch.setenv("ZW_S3_ENDPOINT_URL", "http://localhost:8333")
    monkeypatch.setenv("ZW_LOCAL_WORKERS", "3")
    monkeypatch.setenv("ZW_MAX_QUEUED_PER_RUN", "16")
    monkeypatch.setenv("ZW_LEASE_S", "30.5")
    monkeypatch.setenv("ZW_VISIBILITY_TIMEOUT_S", "7200")

    settings = load_settings()

    assert settings.home == tmp_path / "zw"
    assert not settings.is_embedded
    assert settings.resolved_metadata_url() == "postgresql+psycopg://zw:secret@db:5432/zw"
    assert settings.resolved_artifact_uri() == "s3://bucket/artifacts"
    assert settings.s3_options()["endpoint_url"] == "http://localhost:8333"
    assert (settings.local_workers, settings.max_queued_per_run) == (3, 16)
    assert (settings.lease_s, settings.visibility_timeout_s) == (30.5, 7200.0)
    described = settings.describe()
    assert described["orchestrator"] == "celery"
    assert "secret" not in str(described)


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_URL", "redis://elsewhere:6379/0")
    monkeypatch.setenv("LOCAL_WORKERS", "9")

    settings = load_settings()

    assert settings.broker_url is None and settings.local_workers == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a,b", ["a", "b"]),
        (" cpu , gpu ,", ["cpu", "gpu"]),
        ("cpu", ["cpu"]),
        ("cpu,gpu,big-gpu", ["cpu", "gpu", "big-gpu"]),
    ],
)
def test_queues_from_comma_separated_text(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("ZW_QUEUES", raw)

    assert load_settings().queues == expected


def test_queues_as_a_list_argument() -> None:
    assert load_settings(queues=["x", "y"]).queues == ["x", "y"]
    assert Settings(queues="x,y").queues == ["x", "y"]  # type: ignore[arg-type]


def test_local_worker_count_zero_means_one_per_core() -> None:
    assert load_settings(local_workers=0).local_worker_count() == max(os.cpu_count() or 1, 1)
    assert load_settings(local_workers=2).local_worker_count() == 2


# -- stack files and precedence -----------------------------------------------------------------


def test_stack_file_values_apply(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'broker_url = "redis://team:6379/0"\nqueues = ["cpu", "gpu", "tpu"]\nmax_queued_per_run = 8\n',
    )

    settings = load_settings(path)

    assert settings.reveal_broker_url() == "redis://team:6379/0"
    assert settings.queues == ["cpu", "gpu", "tpu"]
    assert settings.max_queued_per_run == 8


def test_stack_file_keys_may_sit_under_a_stack_table(tmp_path: Path) -> None:
    path = _write(tmp_path, '[stack]\nstack_name = "team"\nlocal_workers = 4\n')

    settings = load_settings(path)

    assert (settings.stack_name, settings.local_workers) == ("team", 4)


def test_stack_file_from_zw_stack_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _write(tmp_path, 'stack_name = "from-env-file"\n')
    monkeypatch.setenv("ZW_STACK_FILE", str(path))

    assert load_settings().stack_name == "from-env-file"


def test_precedence_env_over_file_over_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _write(tmp_path, 'lease_s = 50.0\nqueues = "cpu,file"\nstack_name = "file"\n')
    monkeypatch.setenv("ZW_LEASE_S", "70")
    monkeypatch.setenv("ZW_QUEUES", "cpu,env")

    settings = load_settings(path)

    assert settings.lease_s == 70.0  # env beats the file
    assert settings.queues == ["cpu", "env"]
    assert settings.stack_name == "file"  # the file beats the default
    assert settings.heartbeat_interval_s == Settings.model_fields["heartbeat_interval_s"].default


def test_explicit_overrides_beat_env_and_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _write(tmp_path, "lease_s = 50.0\n")
    monkeypatch.setenv("ZW_LEASE_S", "70")

    assert load_settings(path, lease_s=90.0).lease_s == 90.0


def test_explicit_stack_file_argument_beats_zw_stack_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZW_STACK_FILE", str(_write(tmp_path, 'stack_name = "env"\n', "env.toml")))
    explicit = _write(tmp_path, 'stack_name = "explicit"\n', "explicit.toml")

    assert load_settings(explicit).stack_name == "explicit"


def test_settings_are_frozen() -> None:
    settings = load_settings()

    with pytest.raises(Exception, match="frozen"):
        settings.lease_s = 1.0  # type: ignore[misc]


# -- errors -------------------------------------------------------------------------------------


def test_missing_stack_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"

    with pytest.raises(ConfigurationError) as info:
        load_settings(path)

    assert str(path) in str(info.value) and "ZW_STACK_FILE" in str(info.value)
    assert _one_sentence(str(info.value))


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'broker_url = "redis://unterminated\n')

    with pytest.raises(ConfigurationError) as info:
        load_settings(path)

    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)
    assert isinstance(info.value, ZenMLWorkersError)


def test_unknown_key_in_stack_file_names_it_and_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'broker = "redis://x"\nworkers = 3\n')

    with pytest.raises(ConfigurationError) as info:
        read_stack_file(path)

    message = str(info.value)
    assert str(path) in message
    assert "broker, workers" in message
    assert "broker_url" in message  # the valid keys are listed
    assert _one_sentence(message)


def test_mistyped_value_in_stack_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, 'local_workers = "many"\n')

    with pytest.raises(ConfigurationError) as info:
        load_settings(path)

    message = str(info.value)
    assert "'local_workers'" in message and str(path) in message
    assert _one_sentence(message), message


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZW_LEASE_S", "forever")

    with pytest.raises(ConfigurationError) as info:
        load_settings()

    message = str(info.value)
    assert "ZW_LEASE_S" in message and "'lease_s'" in message
    assert _one_sentence(message), message


def test_unknown_override_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'no_such_setting'"):
        load_settings(no_such_setting=1)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"ZW_HEARTBEAT_INTERVAL_S": "50"}, ("ZW_HEARTBEAT_INTERVAL_S", "ZW_LEASE_S")),
        (
            {"ZW_HEARTBEAT_INTERVAL_S": "5", "ZW_WORKER_TTL_S": "12"},
            ("ZW_HEARTBEAT_INTERVAL_S", "ZW_WORKER_TTL_S"),
        ),
    ],
)
def test_settings_heartbeat_must_be_well_below_lease_and_ttl(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: tuple[str, ...]
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    with pytest.raises(ConfigurationError) as info:
        load_settings()

    assert all(n in str(info.value) for n in names)


def test_settings_default_timing_recovers_a_silent_worker_in_seconds() -> None:
    s = Settings()
    assert s.heartbeat_interval_s * 3 <= min(s.lease_s, s.worker_ttl_s)
    assert s.worker_ttl_s <= 10
