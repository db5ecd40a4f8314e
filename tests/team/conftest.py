"""One team's shared services for the collaboration tests: PostgreSQL, SeaweedFS S3, Redis,
a ``zw scheduler`` and ``zw worker`` processes (a prefork CPU pool and a solo GPU-queue
worker), started once for the whole ``tests/team`` folder.

Teammates are separate processes: :meth:`Team.run_as` runs a script as a user with their own
home (``ZW_HOME``), login name (``ZW_USER``) and working directory, and only the environment
that user would have (the services' URLs and their own credentials, no ``ZW_*`` of the test
process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.services.process import (
    REPO_ROOT,
    TEST_SECRET_KEY,
    ServiceProcess,
    service_env,
    settings_from_env,
)

READY_TIMEOUT_S = 60.0
QUEUES = "cpu,gpu"


@dataclass
class Team:
    """The team's services and how to act as one of its members."""

    root: Path
    env: dict[str, str]
    scheduler: ServiceProcess
    workers: list[ServiceProcess] = field(default_factory=list)

    def home(self, user: str) -> Path:
        home = self.root / "homes" / user
        home.mkdir(parents=True, exist_ok=True)
        return home

    def user_env(self, user: str, **extra: str) -> dict[str, str]:
        """What ``user``'s shell has: the services' settings, their home and login name."""
        return {**self.env, "ZW_HOME": str(self.home(user)), "ZW_USER": user, **extra}

    def settings(self, user: str = "tester", **overrides: Any) -> Any:
        """Client settings for ``user`` in this process (for checks, not for teammates)."""
        # ZW_SKIP_GPU_CHECK is the workers' setting, not the client's.
        return settings_from_env(self.user_env(user), exclude=("ZW_SKIP_GPU_CHECK",), **overrides)

    def run_as(
        self,
        user: str,
        script: str,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        drop: tuple[str, ...] = (),
        timeout_s: float = 120.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` (Python source, dedented) as ``user`` in a process of its own.

        ``env`` replaces or adds variables, ``drop`` removes some of the team's (e.g. the
        S3 secret, to supply another). The script's working directory is ``cwd`` (default: a
        fresh folder of the user's), which is its ``sys.path[0]``, as ``python script.py``.
        """
        workdir = cwd or (self.root / "work" / f"{user}-{uuid.uuid4().hex[:6]}")
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"script_{uuid.uuid4().hex[:6]}.py"
        path.write_text(textwrap.dedent(script))
        child_env = {k: v for k, v in self.user_env(user).items() if k not in drop}
        child_env.update(env or {})
        return _run_checked(
            [sys.executable, str(path)], child_env, workdir, timeout_s, check, f"{user}'s script"
        )

    def zw(
        self,
        user: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        cwd: Path | None = None,
        timeout_s: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """``zw ARGS`` as ``user`` would type it."""
        return _run_checked(
            [sys.executable, "-m", "zenml_workers.cli", *args],
            {**self.user_env(user), **(env or {})},
            cwd or self.home(user),
            timeout_s,
            check,
            f"`zw {' '.join(args)}` as {user}",
        )

    @staticmethod
    def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
        """The last line of a script's stdout, parsed as JSON (scripts print results that way)."""
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        assert lines, f"the script printed nothing; stderr:\n{proc.stderr[-4000:]}"
        return json.loads(lines[-1])


def _run_checked(
    argv: list[str], env: dict[str, str], cwd: Path, timeout_s: float, check: bool, what: str
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with only ``env``'s ``ZW_*`` settings; with ``check``, fail the test with
    its output when it exits non-zero."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=service_env(env, drop_prefixes=("ZW_",)),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _start(
    root: Path, name: str, argv: list[str], env: dict[str, str], ready: str
) -> ServiceProcess:
    proc = ServiceProcess(
        name,
        argv,
        log_path=root / f"{name.replace(' ', '-').replace('@', '-')}.log",
        env=service_env(env, drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
    ).start()
    try:
        proc.wait_for_log(ready, READY_TIMEOUT_S)
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture(scope="package")
def team(
    redis_server: Any,
    postgres_server: Any,
    s3_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Team]:
    root = tmp_path_factory.mktemp("team")
    env = {
        "ZW_BROKER_URL": redis_server.db_url(11),
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_METADATA_URL": postgres_server.create_database(f"team_{uuid.uuid4().hex[:8]}"),
        "ZW_ARTIFACT_URI": f"s3://{s3_server.make_bucket()}/artifacts",
        "ZW_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "ZW_S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "ZW_S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "ZW_S3_REGION": s3_server.region,
        "ZW_QUEUES": QUEUES,
        "ZW_SKIP_GPU_CHECK": "1",
        "ZW_HEARTBEAT_INTERVAL_S": "1",
        "ZW_WORKER_TTL_S": "10",
        "ZW_LEASE_S": "30",
    }
    services_env = {**env, "ZW_HOME": str(root / "services-home"), "ZW_USER": "ops"}
    cli = [sys.executable, "-m", "zenml_workers.cli"]
    scheduler = _start(root, "zw scheduler", [*cli, "scheduler"], services_env, "scheduler started")
    team = Team(root=root, env=env, scheduler=scheduler)
    try:
        for name, argv in (
            ("cpu@team", ["--queues", "cpu", "--pool", "prefork", "--concurrency", "2"]),
            ("gpu@team", ["--queues", "gpu", "--pool", "solo"]),
        ):
            team.workers.append(
                _start(
                    root,
                    f"zw worker {name}",
                    [*cli, "worker", "--hostname", name, "--loglevel", "INFO", *argv],
                    services_env,
                    f"{name} ready.",
                )
            )
        yield team
    finally:
        from zenml_workers.sdk.stack import close_stacks

        close_stacks()
        for proc in reversed(team.workers):
            proc.stop()
        scheduler.stop()
