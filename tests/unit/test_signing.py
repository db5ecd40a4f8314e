"""Signed step messages: signing, verification, rotation and the refusal to run unsigned."""

from __future__ import annotations

import pytest

from scheduler.specs import StepTask
from zenml_workers.errors import ConfigurationError
from zenml_workers.settings import Settings
from zenml_workers.worker.signing import Signer, key_id, require_key, signer_for

NEW, OLD, OTHER = b"new-team-key", b"old-team-key", b"someone-elses-key"
TASK = StepTask(run_id="r", step_run_id="s", invocation_id="train", pipeline="p").encode()


def _signer(key: bytes | None, *accepted: bytes, insecure: bool = False) -> Signer:
    return Signer(key, accepted, insecure=insecure)


def test_signing_round_trips_and_decodes() -> None:
    signed = _signer(NEW, NEW).sign(TASK)

    assert _signer(NEW, NEW).refusal(signed) is None
    assert StepTask.decode(signed).invocation_id == "train"
    assert key_id(NEW) in signed["sig"] and NEW.decode() not in signed["sig"]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (TASK, "not signed"),
        (_signer(OTHER, OTHER).sign(TASK), "does not accept"),
        ({**_signer(NEW, NEW).sign(TASK), "invocation_id": "evaluate"}, "does not match"),
        ({**_signer(NEW, NEW).sign(TASK), "inputs": [{"uri": "s3://evil/x"}]}, "does not match"),
        ({**TASK, "sig": "v1:abc"}, "malformed"),
        ({**TASK, "sig": 42}, "malformed"),
        (["not", "a", "task"], "not an object"),
    ],
)
def test_signing_refuses_unsigned_forged_and_altered_messages(message: object, reason: str) -> None:
    refusal = _signer(NEW, NEW).refusal(message)
    assert refusal is not None and reason in refusal


def test_signing_rotation_accepts_the_previous_key_but_signs_with_the_new() -> None:
    rolling = _signer(NEW, NEW, OLD)
    old_message = _signer(OLD, OLD).sign(TASK)

    assert rolling.refusal(old_message) is None
    assert key_id(NEW) in rolling.sign(TASK)["sig"]
    assert _signer(NEW, NEW).refusal(old_message) is not None  # after the grace period


def test_signing_insecure_accepts_unsigned_messages_only_when_asked() -> None:
    assert _signer(None, insecure=True).refusal(TASK) is None
    assert _signer(None).refusal(TASK) is not None


def test_signing_keys_come_from_settings_a_key_file_and_previous_keys(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    s = Settings(secret_key_file=key_file, previous_secret_keys="old-1, old-2")

    current, accepted = s.signing_keys()

    assert current == b"from-a-file"
    assert accepted == [b"from-a-file", b"old-1", b"old-2"]
    assert signer_for(s).refusal(_signer(b"old-2", b"old-2").sign(TASK)) is None


def test_signing_a_cluster_role_without_a_key_refuses_to_start() -> None:
    with pytest.raises(ConfigurationError, match="ZW_SECRET_KEY.*ZW_INSECURE=1"):
        require_key(Settings(broker_url="redis://h/0"), "worker")
    require_key(Settings(broker_url="redis://h/0", insecure=True), "worker")
    require_key(Settings(broker_url="redis://h/0", secret_key="k"), "worker")


def test_signing_an_empty_key_file_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigurationError, match="is empty"):
        Settings(secret_key_file=tmp_path / "key").signing_keys()
