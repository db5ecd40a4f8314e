"""Garbage on a Redis queue: a real Celery worker dead-letters it and keeps serving."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.pipelines import cluster as pl
from tests.services.celery import REPO_ROOT, service_env, start_celery_worker
from tests.services.process import TEST_SECRET_KEY, ServiceProcess
from zenml_workers import submit
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings
from zenml_workers.worker.broker import (
    DEAD_LETTER_KEY,
    DEAD_LETTER_LIMIT,
    DeadLetter,
    DeadLetterList,
)
from zenml_workers.worker.signing import Signer

pytestmark = pytest.mark.services

RUN_TIMEOUT_S = 60.0


@dataclass
class Garbage:
    """What the garbage test needs: the worker, its stack and a Redis client."""

    settings: Settings
    env: dict[str, str]
    worker: ServiceProcess
    client: redis.Redis


@pytest.fixture()
def garbage(redis_url: str, tmp_path: Path) -> Iterator[Garbage]:
    env = {
        "ZW_BROKER_URL": redis_url,
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_METADATA_URL": f"sqlite:///{tmp_path / 'm.db'}",
        "ZW_ARTIFACT_URI": str(tmp_path / "artifacts"),
        "ZW_HOME": str(tmp_path / "home"),
    }
    settings = Settings(
        broker_url=env["ZW_BROKER_URL"],
        secret_key=TEST_SECRET_KEY,
        metadata_url=env["ZW_METADATA_URL"],
        artifact_uri=env["ZW_ARTIFACT_URI"],
        home=tmp_path / "home",
    )
    worker = start_celery_worker(
        "zenml_workers.worker",
        ["cpu"],
        1,
        env,
        "cpu@garbage",
        log_dir=tmp_path,
        drop_env_prefixes=("ZW_",),
    )
    client = redis.Redis.from_url(redis_url)
    try:
        yield Garbage(settings=settings, env=env, worker=worker, client=client)
    finally:
        close_stacks()
        worker.stop()
        client.close()


def _envelope(body: str) -> dict[str, object]:
    """A kombu envelope for a ``zw.step`` message with ``body`` as its base64 body."""
    task_id = str(uuid.uuid4())
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "zw.step", "id": task_id, "root_id": task_id},
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "cpu"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", *args],
        env=service_env(env, drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_garbage_messages_are_dead_lettered_and_the_worker_keeps_serving(
    garbage: Garbage,
) -> None:
    client, worker = garbage.client, garbage.worker
    # (what is pushed, the start of the reason it is dropped for), oldest first.
    pushed = [
        (b"\x00\xff\xfe this is not JSON", "not JSON ("),
        (b"[1, 2, 3]", "not a message envelope: a JSON list, not an object"),
        (json.dumps(_envelope("not base64!")).encode(), "'body' is not base64 ("),
        (
            json.dumps(_envelope(base64.b64encode(b'{"x": 1}').decode())).encode(),
            "task body is a JSON object, not [args, kwargs, embed]",
        ),
    ]
    for raw, _ in pushed:
        client.lpush("cpu", raw)
    sender = Celery("garbage-sender", broker=garbage.env["ZW_BROKER_URL"], set_as_current=False)
    try:
        # Signed with the team's key, so it passes the signature check and fails to decode.
        signed = Signer(TEST_SECRET_KEY.encode(), [TEST_SECRET_KEY.encode()], insecure=False)
        bad_task = sender.send_task(
            "zw.step", kwargs={"task": signed.sign({"nope": 1})}, queue="cpu"
        )
    finally:
        sender.close()
    expected = [*(reason for _, reason in pushed), "argument 'task' is not a step task ("]

    worker.wait_until(
        lambda: client.llen(DEAD_LETTER_KEY) >= len(expected), 30, "a dead letter per message"
    )
    run = submit(pl.small, settings=garbage.settings, x=1).wait(timeout_s=RUN_TIMEOUT_S)

    assert run.status == "completed"
    assert run.steps["add_one_2"].output.load() == 3
    assert worker.is_running(), worker.log_tail()
    records = [json.loads(item) for item in client.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert all(r.keys() == {"queue", "reason", "raw", "at"} for r in records)
    assert {r["queue"] for r in records} == {"cpu"}
    # Newest first: one record per message, in the order the worker popped them.
    oldest_first = records[::-1]
    assert [r["reason"][: len(e)] for r, e in zip(oldest_first, expected, strict=True)] == expected
    assert oldest_first[-1]["reason"] == "argument 'task' is not a step task (KeyError: 'run_id')"
    assert oldest_first[0]["raw"] == "\x00\ufffd\ufffd this is not JSON"
    assert [r["raw"].encode() for r in oldest_first[1:4]] == [raw for raw, _ in pushed[1:]]
    assert json.loads(oldest_first[-1]["raw"])["nope"] == 1
    assert [r["at"] for r in records] == sorted((r["at"] for r in records), reverse=True)
    log = worker.log_text()
    assert log.count("dropped a message from queue 'cpu'") == len(pushed)
    assert log.count(f"dropped task {bad_task.id} from queue 'cpu'") == 1
    assert "Unrecoverable error" not in log

    listed = _cli(garbage.env, "dead-letters")

    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    for line, record in zip(lines, records, strict=True):
        assert f"  cpu  {record['reason']}  " in line
    assert lines[-2].endswith("  '[1, 2, 3]'")

    cleared = _cli(garbage.env, "dead-letters", "--limit", "1", "--clear")

    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.splitlines() == [
        lines[0],
        f"cleared {len(expected)} record(s) from {DEAD_LETTER_KEY}",
    ]
    assert client.llen(DEAD_LETTER_KEY) == 0
    assert _cli(garbage.env, "dead-letters").stdout.startswith("no dead letters in zw:dead-letter")


def test_garbage_broadcast_is_dead_lettered_and_control_still_answers(garbage: Garbage) -> None:
    client, worker = garbage.client, garbage.worker

    def published_and_dropped() -> bool:
        # kombu's fanout channel for Celery's control exchange; the worker subscribes to it
        # shortly after it reports ready, so publish until one has arrived.
        if not client.llen(DEAD_LETTER_KEY):
            client.publish("/0.celery.pidbox", json.dumps([1, 2]))
        return bool(client.llen(DEAD_LETTER_KEY))

    worker.wait_until(published_and_dropped, 30, "a dead-lettered broadcast")

    records = [json.loads(item) for item in client.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert {r["reason"] for r in records} == {"not a message envelope: a JSON list, not an object"}
    assert {r["queue"] for r in records} == {"cpu@garbage.celery.pidbox"}
    pinger = Celery("garbage-ping", broker=garbage.env["ZW_BROKER_URL"], set_as_current=False)
    try:
        replies = pinger.control.ping(destination=["cpu@garbage"], timeout=5)
    finally:
        pinger.close()
    assert replies == [{"cpu@garbage": {"ok": "pong"}}]
    assert worker.is_running(), worker.log_tail()


def test_dead_letter_list_keeps_the_newest_thousand(redis_url: str) -> None:
    dead = DeadLetterList.from_url(redis_url)
    try:
        for i in range(DEAD_LETTER_LIMIT + 5):
            dead.push(DeadLetter.of("cpu", f"r{i}", b"x", now=float(i)))
        newest = dead.newest(DEAD_LETTER_LIMIT + 10)
    finally:
        dead.client.close()

    assert len(newest) == DEAD_LETTER_LIMIT
    assert [getattr(n, "reason", None) for n in newest[:2]] == [
        f"r{DEAD_LETTER_LIMIT + 4}",
        f"r{DEAD_LETTER_LIMIT + 3}",
    ]


def test_dead_letters_cli_without_a_broker_says_so(tmp_path: Path) -> None:
    out = _cli({"ZW_HOME": str(tmp_path / "home")}, "dead-letters")

    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "there is no broker on the embedded default, so no dead letters; "
        "set ZW_BROKER_URL to read a cluster's"
    )
