"""Live step logs: a running step's lines read through ``Client().logs()`` and followed by
``zw logs -f`` (a real subprocess) while it still runs, on the embedded default and on a
prefork Celery worker with PostgreSQL; each line stored once, attempts kept apart."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pipelines import fixtures
from tests.pipelines import live_logs as pl
from tests.services.celery import REPO_ROOT, service_env, start_celery_worker
from tests.services.process import TEST_SECRET_KEY, ServiceProcess, wait_until
from zenml_workers import Client, submit
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings

local_stack = fixtures.local_stack

TIMEOUT_S = 60.0


class Follower:
    """``python -m zenml_workers.cli logs -f RUN STEP`` with its output collected as it comes."""

    def __init__(self, run_id: str, step: str, env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zenml_workers.cli", "logs", "-f", run_id, step],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env),
            cwd=REPO_ROOT,
        )
        self._out: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.append(line)

    @property
    def text(self) -> str:
        return "".join(self._out)

    def wait_for(self, text: str) -> None:
        wait_until(
            lambda: text in self.text,
            TIMEOUT_S,
            f"`zw logs -f` to print {text!r}",
            alive=lambda: self.proc.poll() is None,
        )

    def finish(self) -> tuple[int, str, str]:
        """Wait for the command to end by itself; its exit status, stdout and stderr."""
        try:
            self.proc.wait(TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(TIMEOUT_S)
        assert self.proc.stderr is not None
        return self.proc.returncode, self.text, self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT_S)


def _zw(env: Mapping[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", *args],
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=REPO_ROOT,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _check_live(client: Client, submit_run: str, marker_dir: Path, env: Mapping[str, str]) -> str:
    """Read the held step's first lines while it runs, release it, see ``-f`` end; returns
    what ``-f`` printed."""
    wait_until(lambda: (marker_dir / "started").exists(), TIMEOUT_S, "the step to start")
    wait_until(
        lambda: "a log record" in client.logs(submit_run, "ticking"),
        TIMEOUT_S,
        "the first lines to be stored while the step runs",
    )
    follower = Follower(submit_run, "ticking", env)
    try:
        follower.wait_for("a log record")
        # Still running: the step waits for the release marker, so -f cannot have ended.
        assert client.get_run(submit_run).steps["ticking"].status == "running"
        assert follower.proc.poll() is None
        so_far = client.logs(submit_run, "ticking")
        assert "tick 0\ntick 1\ntick 2\n" in so_far
        assert "released" not in so_far
        now = _zw(env, "logs", submit_run, "ticking")  # without -f: what exists, at once
        assert "tick 2\n" in now and "released" not in now

        (marker_dir / "release").write_text("go")
        code, out, err = follower.finish()
    finally:
        follower.stop()
    assert code == 0, err
    return out


def _check_lines(client: Client, run_id: str) -> None:
    """Each line once, with its stream, in order."""
    lines = client.log_lines(run_id, "ticking")
    ours = [(ln.stream, ln.text) for ln in lines if "zenml_workers" not in ln.text]
    assert ours[:4] == [
        ("stdout", "tick 0\n"),
        ("stdout", "tick 1\n"),
        ("stdout", "tick 2\n"),
        ("stderr", "a stderr line\n"),
    ]
    assert ours[4][0] == "log" and ours[4][1].endswith("WARNING tests.live_logs: a log record\n")
    assert ours[5:] == [("stdout", "released\n")]
    assert [ln.seq for ln in lines] == list(range(len(lines)))
    assert all(ln.ts is not None and ln.ts > 0 for ln in lines)
    text = client.logs(run_id, "ticking")
    assert client.get_run(run_id).steps["ticking"].logs == text
    for needle in ("tick 0\n", "tick 2\n", "a stderr line\n", "a log record\n", "released\n"):
        assert text.count(needle) == 1, (needle, text)
    assert "celery.redirected" not in text


def test_live_logs_on_the_embedded_default(local_stack: Settings, tmp_path: Path) -> None:
    handle = submit(pl.ticker, marker_dir=str(tmp_path))
    client = Client()

    out = _check_live(client, handle.id, tmp_path, service_env())

    run = handle.wait(timeout_s=TIMEOUT_S)
    assert run.status == "completed"
    assert out == client.logs(run.id, "ticking")  # -f printed everything, once, and ended
    _check_lines(client, run.id)
    stamped = _zw(service_env(), "logs", "-t", run.id, "ticking").splitlines()
    assert [line.split()[2:] for line in stamped if line.split()[3:4] == ["tick"]] == [
        ["stdout", "tick", "0"],
        ["stdout", "tick", "1"],
        ["stdout", "tick", "2"],
    ]
    assert stamped[-1].split()[0] == time.strftime("%Y-%m-%d", time.gmtime(run.ended_at or 0))


def test_live_logs_keep_each_attempt_apart(local_stack: Settings, tmp_path: Path) -> None:
    run = pl.retried(marker_dir=str(tmp_path))

    client = Client()
    assert run.steps["flaky"].attempt == 2
    first = client.logs(run.id, "flaky", attempt=1)
    second = client.logs(run.id, "flaky")
    assert "output of attempt one\n" in first and "attempt two" not in first
    assert "output of attempt two\n" in second and "attempt one" not in second
    assert client.logs(run.id, "flaky", attempt=2) == second


def test_live_logs_store_nothing_for_silent_steps(local_stack: Settings) -> None:
    from sqlalchemy import func, select

    from stores.metadata.models import StepLogRow
    from tests.pipelines import basic
    from zenml_workers.sdk.stack import get_stack

    run = basic.chain(n=3)

    assert run.status == "completed"
    with get_stack().metadata.read() as s:
        assert s.execute(select(func.count()).select_from(StepLogRow)).scalar_one() == 0
    assert all(st.logs == "" for st in run.steps.values())


@dataclass
class Cluster:
    settings: Settings
    env: dict[str, str]
    worker: ServiceProcess


@pytest.fixture(scope="module")
def cluster(
    redis_server, postgres_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("live-logs")
    env = {
        "ZW_BROKER_URL": redis_server.db_url(5),
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_METADATA_URL": postgres_server.create_database(f"logs_{uuid.uuid4().hex[:8]}"),
        "ZW_HOME": str(home / "home"),  # artifacts in a local folder the worker shares
        "ZW_QUEUES": "cpu",
    }
    settings = Settings(
        broker_url=env["ZW_BROKER_URL"],
        secret_key=TEST_SECRET_KEY,
        metadata_url=env["ZW_METADATA_URL"],
        home=home / "home",
        queues=["cpu"],
    )
    worker = start_celery_worker(
        "zenml_workers.worker", ["cpu"], 1, env, "logs@zwtest", pool="prefork", log_dir=home
    )
    try:
        yield Cluster(settings=settings, env=env, worker=worker)
    finally:
        close_stacks()
        worker.stop()


@pytest.mark.services
def test_live_logs_on_a_prefork_worker_with_postgresql(cluster: Cluster, tmp_path: Path) -> None:
    handle = submit(pl.ticker, settings=cluster.settings, marker_dir=str(tmp_path))
    client = Client(cluster.settings)

    out = _check_live(client, handle.id, tmp_path, service_env(cluster.env, drop_prefixes=("ZW_",)))

    run = handle.wait(timeout_s=TIMEOUT_S)
    assert run.status == "completed"
    assert out == client.logs(run.id, "ticking")
    _check_lines(client, run.id)
    # The worker's own log shows each printed line once, as printed: not turned into a
    # "WARNING/ForkPoolWorker" record by Celery's stdout redirect, and not twice.
    worker_log = cluster.worker.log_text()
    for printed in ("tick 1", "a stderr line"):
        assert worker_log.count(printed) == 1, worker_log
        assert printed in worker_log.splitlines(), worker_log
    assert worker_log.count("a log record") == 1, worker_log
