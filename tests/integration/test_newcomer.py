"""Small things a newcomer hits first: ``zw runs`` and ``zw show``, the scheduler's start-up log,
plain ``celery`` without a broker, the worker banner, ``dump.rdb``.

CLI commands run through click's ``CliRunner`` on the embedded default, or as real
processes where their start-up is the point.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.pipelines import basic, fixtures
from tests.services.process import REPO_ROOT, TEST_SECRET_KEY, ServiceProcess, service_env
from zenml_workers import submit
from zenml_workers.cli import cli
from zenml_workers.errors import ConfigurationError
from zenml_workers.settings import Settings

local_stack = fixtures.local_stack

RUN_TIMEOUT_S = 90.0
#: Long enough for a process that starts and exits; a worker retrying a broker never exits.
EXIT_TIMEOUT_S = 60.0
LONG_PIPELINE = "nightly_feature_engineering_and_training_pipeline"


def _run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "100"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_runs_shows_who_ran_each_run_and_fits_100_columns(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZW_USER", "ada")
    short = submit(basic.chain, n=1).wait(timeout_s=RUN_TIMEOUT_S, progress=False)
    monkeypatch.setenv("ZW_USER", "bartholomew-the-intern")
    long = submit(basic.chain.with_options(name=LONG_PIPELINE), n=2).wait(
        timeout_s=RUN_TIMEOUT_S, progress=False
    )

    lines = _run_cli("runs").rstrip("\n").splitlines()

    assert max(len(line) for line in lines) <= 100, "\n".join(lines)
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {short.id[:8], long.id[:8]}  # one line per run: nothing wrapped
    assert re.search(r"\bada\b", rows[short.id[:8]])
    assert "bartholom" in rows[long.id[:8]] and "nightly_feature" in rows[long.id[:8]]


def test_show_header_names_the_user_and_git_commit(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZW_USER", "ada")
    run = submit(basic.chain, n=1).wait(timeout_s=RUN_TIMEOUT_S, progress=False)
    commit = run.environment["git"].get("commit")
    assert commit, "the test pipelines live in this repository's git checkout"

    header = _run_cli("show", run.id[:8]).splitlines()[:3]

    assert any(line.startswith(f"by ada, git {commit[:12]}") for line in header), header


def _fresh_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The child's environment: no ZW_/CELERY_ settings of this process, a new ZW_HOME."""
    env = {"ZW_HOME": str(tmp_path / "home"), **extra}
    return service_env(env, drop_prefixes=("ZW_", "CELERY_"))


def test_scheduler_start_prints_no_alembic_lines(tmp_path: Path) -> None:
    env = _fresh_env(
        tmp_path,
        ZW_BROKER_URL="redis://127.0.0.1:9/0",  # --once with nothing to send never connects
        ZW_SECRET_KEY=TEST_SECRET_KEY,
    )

    result = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "scheduler", "--once"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )

    assert result.returncode == 0, result.stderr
    assert "migrated metadata store" in result.stderr  # it did migrate a new store here
    assert "alembic" not in result.stderr + result.stdout


def test_plain_celery_without_a_broker_exits_at_once_with_one_sentence(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "zenml_workers.worker", "worker"],
        env=_fresh_env(tmp_path),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )

    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: no broker configured: set ZW_BROKER_URL (e.g. redis://localhost:6379/0) for "
        "`celery -A zenml_workers.worker`; the embedded default needs no worker"
    ]


def test_worker_app_without_a_broker_raises_configuration_error(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zenml_workers.worker as worker

    monkeypatch.delitem(sys.modules, "celery.bin.celery", raising=False)
    monkeypatch.setattr(worker, "_app", None)

    with pytest.raises(ConfigurationError, match="ZW_BROKER_URL"):
        _ = worker.app


@pytest.mark.services
def test_solo_worker_banner_shows_one_slot_and_no_password_slot(
    redis_server, tmp_path: Path
) -> None:
    url = redis_server.db_url(7)
    env = _fresh_env(tmp_path, ZW_BROKER_URL=url, ZW_SECRET_KEY=TEST_SECRET_KEY)
    argv = [sys.executable, "-m", "zenml_workers.cli", "worker", "--queues", "gpu"]
    argv += ["--skip-gpu-check", "--hostname", "gpu@zwbanner"]
    worker = ServiceProcess(
        "zw worker gpu", argv, log_path=tmp_path / "worker.log", env=env, cwd=REPO_ROOT
    )
    worker.start()
    try:
        worker.wait_for_log(" ready.", EXIT_TIMEOUT_S)
        log = worker.log_text()
    finally:
        worker.stop()

    assert re.search(r"\.> transport: +" + re.escape(url) + r"\s", log), log
    assert ":**@" not in log
    assert re.search(r"concurrency: 1 \(solo\)", log), log


def test_gitignore_keeps_a_redis_dump_untracked() -> None:
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "dump.rdb", "tests/dump.rdb"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dump.rdb", "tests/dump.rdb"]
