"""Trust boundaries against a real worker: forged messages, tampered code, secrets on the wire."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from pydantic import SecretStr
from sqlalchemy import select, update

from scheduler.specs import StepTask
from stores.metadata.models import CodeBlobRow, StepRunRow
from tests.pipelines import cluster as pl
from tests.services.celery import REPO_ROOT, service_env, start_celery_worker
from tests.services.process import TEST_SECRET_KEY, ServiceProcess, free_port, wait_until
from zenml_workers import Client, submit
from zenml_workers.errors import ConfigurationError, StepFailedError
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings
from zenml_workers.worker.broker import DEAD_LETTER_KEY
from zenml_workers.worker.signing import Signer

pytestmark = pytest.mark.services

KEY = TEST_SECRET_KEY.encode()
S3_SECRET = "s3-secret-that-must-not-leak"
OLD_KEY = "previous-key-that-must-not-leak"


@dataclass
class Worker:
    settings: Settings
    env: dict[str, str]
    process: ServiceProcess
    client: redis.Redis


@pytest.fixture()
def worker(redis_url: str, tmp_path: Path) -> Iterator[Worker]:
    env = {
        "ZW_BROKER_URL": redis_url,
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_PREVIOUS_SECRET_KEYS": OLD_KEY,
        "ZW_S3_SECRET_ACCESS_KEY": S3_SECRET,  # unused (local artifacts), but configured
        "ZW_METADATA_URL": f"sqlite:///{tmp_path / 'm.db'}",
        "ZW_ARTIFACT_URI": str(tmp_path / "artifacts"),
        "ZW_HOME": str(tmp_path / "home"),
        "ZW_QUEUES": "cpu,gpu,nowhere",
        "EVIL_MARKER": str(tmp_path / "evil-imported"),
    }
    settings = Settings(
        broker_url=redis_url,
        secret_key=TEST_SECRET_KEY,
        metadata_url=env["ZW_METADATA_URL"],
        artifact_uri=env["ZW_ARTIFACT_URI"],
        home=tmp_path / "home",
        queues=["cpu", "gpu", "nowhere"],
    )
    process = start_celery_worker(
        "zenml_workers.worker",
        ["cpu"],
        1,
        env,
        "cpu@trust",
        log_dir=tmp_path,
        drop_env_prefixes=("ZW_",),
    )
    client = redis.Redis.from_url(redis_url)
    try:
        yield Worker(settings=settings, env=env, process=process, client=client)
    finally:
        close_stacks()
        process.stop()
        client.close()


def _send(broker_url: str, task: dict[str, Any]) -> None:
    sender = Celery("forger", broker=broker_url, set_as_current=False)
    try:
        sender.send_task("zw.step", kwargs={"task": task}, queue="cpu")
    finally:
        sender.close()


def _dead_reasons(client: redis.Redis) -> list[str]:
    return [json.loads(item)["reason"] for item in client.lrange(DEAD_LETTER_KEY, 0, -1)][::-1]


def test_trust_worker_refuses_forged_messages_and_keeps_serving(worker: Worker) -> None:
    # A real queued step nobody consumes: if any forgery were run, it would claim this step.
    target = submit(pl.unroutable, settings=worker.settings)
    with Client(worker.settings)._stack.metadata.read() as s:
        row = s.execute(select(StepRunRow).where(StepRunRow.run_id == target.id)).scalar_one()
    task = StepTask(
        run_id=target.id, step_run_id=row.id, invocation_id="stranded", pipeline="unroutable"
    ).encode()
    outside = {
        "step": "x",
        "output": "output",
        "id": "a1",
        "uri": "s3://attacker-bucket/payload.pkl",
        "materializer": "zenml_workers.sdk.materializers.cloudpickle:CloudpickleMaterializer",
        "data_type": "builtins:object",
        "content_hash": "sha256:00",
    }
    team = Signer(KEY, [KEY], insecure=False)
    forgeries = [
        (task, "the step message is not signed"),
        (Signer(b"guessed", [b"guessed"], insecure=False).sign(task), "does not accept"),
        ({**team.sign(task), "invocation_id": "other"}, "does not match its signature"),
        (team.sign({**task, "inputs": [outside]}), "outside this stack's artifact store"),
    ]
    for forged, _ in forgeries:
        _send(worker.settings.reveal_broker_url(), forged)

    wait_until(
        lambda: len(_dead_reasons(worker.client)) >= len(forgeries), 30, "every forgery refused"
    )
    reasons = _dead_reasons(worker.client)
    assert [any(r in got for got in reasons) for _, r in forgeries] == [True] * len(forgeries)
    with Client(worker.settings)._stack.metadata.read() as s:
        after = s.execute(select(StepRunRow).where(StepRunRow.id == row.id)).scalar_one()
    assert (after.status, after.attempt, after.worker_host) == ("queued", 0, None)
    assert worker.process.is_running()
    log = worker.process.log_text()
    assert "payload.pkl" in log and "unpickl" not in log.lower()
    # The worker still serves signed work, and a message signed with the previous key too.
    assert submit(pl.small, settings=worker.settings, x=1).wait(timeout_s=60).status == "completed"
    rolling = worker.settings.model_copy(update={"secret_key": SecretStr(OLD_KEY)})
    assert submit(pl.small, settings=rolling, x=2).wait(timeout_s=60).status == "completed"
    target.cancel()


def test_trust_materializer_named_by_a_message_is_never_imported(
    worker: Worker, tmp_path: Path
) -> None:
    """Even a signed message cannot make a worker import a module of its choosing."""
    handle = submit(pl.parked_after_make, settings=worker.settings, x=2)
    metadata = Client(worker.settings)._stack.metadata

    def parked_row() -> Any:
        with metadata.read() as s:
            return s.execute(
                select(StepRunRow).where(
                    StepRunRow.run_id == handle.id, StepRunRow.invocation_id == "parked"
                )
            ).scalar_one()

    wait_until(lambda: parked_row().status == "queued", 30, "make to finish")
    made = Client(worker.settings).get_run(handle.id).steps["make"].outputs["value"]
    evil_input = {
        "step": "make",
        "output": "value",
        "id": made.id,
        "uri": made.uri,  # inside the store: only the materializer is foreign
        "materializer": "tests.pipelines.evil_materializer:Evil",
        "data_type": "builtins:int",
        "content_hash": made.content_hash,
    }
    task = StepTask(
        run_id=handle.id,
        step_run_id=parked_row().id,
        invocation_id="parked",
        pipeline="parked_after_make",
        inputs=[evil_input],
    ).encode()
    _send(worker.settings.reveal_broker_url(), Signer(KEY, [KEY], insecure=False).sign(task))

    run = handle.wait(timeout_s=60, progress=False)
    # The worker read the input's real materializer from the metadata store instead.
    assert run.steps["parked"].output.load() == 102
    assert not (tmp_path / "evil-imported").exists()
    assert worker.process.is_running()


def test_trust_tampered_code_blob_is_refused(worker: Worker, tmp_path: Path) -> None:
    from scheduler.recovery import RecoveryPolicy, recover
    from zenml_workers.worker.celery_app import create_app, send_steps

    # Recorded while the broker is unreachable, so nothing runs before the tampering.
    offline = worker.settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    handle = submit(pl.integrity, settings=offline, x=5)
    metadata = Client(worker.settings)._stack.metadata
    with metadata.transaction() as s:
        code_hash = s.execute(
            select(StepRunRow.code_hash).where(StepRunRow.run_id == handle.id)
        ).scalar_one()
        s.execute(
            update(CodeBlobRow).where(CodeBlobRow.code_hash == code_hash).values(pickled=b"evil")
        )
    with metadata.transaction() as s:
        resend = recover(s, now=time.time(), policy=RecoveryPolicy(), resend_all_queued=True)
    app = create_app(worker.settings)
    try:
        send_steps(app, [q for q in resend if q.task.run_id == handle.id])
    finally:
        app.close()

    with pytest.raises(StepFailedError, match="CodeIntegrityError.*altered") as info:
        handle.wait(timeout_s=60, progress=False)
    assert info.value.step == "guarded"


def test_trust_no_secret_in_celery_inspect_conf_or_flower(worker: Worker, start_flower) -> None:
    secrets = (TEST_SECRET_KEY, OLD_KEY, S3_SECRET)
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "zenml_workers.worker", "inspect", "conf", "-j"],
        env=service_env(worker.env, drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "cpu@trust" in out.stdout
    assert not [s for s in secrets if s in out.stdout + out.stderr]

    flower = start_flower(worker.settings.reveal_broker_url())
    flower.wait_for_worker("cpu@trust")
    workers = json.dumps(flower.get_json("/api/workers?refresh=1"))
    assert "cpu@trust" in workers
    assert not [s for s in secrets if s in workers]

    stack = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "stack"],
        env=service_env(worker.env, drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stack.returncode == 0 and "broker" in stack.stdout
    assert not [s for s in secrets if s in stack.stdout]


def test_trust_cluster_parts_refuse_to_start_without_a_key(worker: Worker, tmp_path: Path) -> None:
    unsigned = {k: v for k, v in worker.env.items() if "SECRET_KEY" not in k}
    out = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "worker", "--queues", "cpu"],
        env=service_env(unsigned, drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "ZW_SECRET_KEY" in out.stdout + out.stderr and "ZW_INSECURE=1" in out.stdout + out.stderr

    bare = worker.settings.model_copy(update={"secret_key": None, "home": tmp_path / "bare"})
    with pytest.raises(ConfigurationError, match="ZW_SECRET_KEY"):
        submit(pl.small, settings=bare, x=1)
