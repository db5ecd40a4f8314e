"""The deployment files are valid: compose config and Dockerfile lint, without a Docker engine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.services.process import require_binary

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*.Dockerfile"))
EXPECTED_SERVICES = {
    "redis",
    "postgres",
    "minio",
    "minio-init",
    "scheduler",
    "worker-cpu",
    "worker-gpu",
    "flower",
}
SECRETS = {
    "ZW_S3_ACCESS_KEY_ID": "zw-test",
    "ZW_S3_SECRET_ACCESS_KEY": "zw-test-secret",
    "FLOWER_BASIC_AUTH": "admin:test",
}


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = require_binary("docker-compose")
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _env_without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SECRETS}


def test_docker_compose_config_is_valid() -> None:
    result = _compose("config", "-q", env=_env_without_secrets() | SECRETS)

    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_docker_compose_defines_every_service() -> None:
    result = _compose("config", "--services", env=_env_without_secrets() | SECRETS)

    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == EXPECTED_SERVICES


def test_docker_compose_requires_secrets() -> None:
    result = _compose("config", "-q", env=_env_without_secrets())

    assert result.returncode != 0
    assert "ZW_S3_ACCESS_KEY_ID" in result.stderr


def test_dockerfiles_pass_hadolint() -> None:
    binary = require_binary("hadolint")
    names = {path.name for path in DOCKERFILES}
    assert {"worker.Dockerfile", "worker-gpu.Dockerfile", "scheduler.Dockerfile"} <= names

    result = subprocess.run(
        [binary, "--no-color", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root(dockerfile: Path) -> None:
    users = [
        line.split(None, 1)[1].strip()
        for line in dockerfile.read_text().splitlines()
        if line.startswith("USER ")
    ]

    assert users, f"{dockerfile.name} has no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}
