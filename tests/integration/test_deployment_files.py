"""The deployment files are valid and locked down, without a Docker engine.

Compose config and Dockerfile lint; every secret comes from ``.env`` (``.env.example`` lists
them); only Flower and the client ports the README names are published, on 127.0.0.1; Flower
gets the broker and nothing else; MinIO's root stays in MinIO. And ``zw flower`` refuses to
run without a log-in and keeps the broker password and the log-in out of ``ps``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.services.process import (
    REPO_ROOT,
    ServiceProcess,
    free_port,
    require_binary,
    service_env,
    service_unavailable,
)
from zenml_workers.cli import cli

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
README = REPO_ROOT / "README.md"
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
#: Recognisable stand-ins for every variable the compose file needs.
SECRETS = {
    "ZW_REDIS_PASSWORD": "redis-pw-1f3a",
    "ZW_POSTGRES_PASSWORD": "postgres-pw-6b2c",
    "ZW_MINIO_ROOT_USER": "minio-root-9d41",
    "ZW_MINIO_ROOT_PASSWORD": "minio-root-pw-52e7",
    "ZW_S3_ACCESS_KEY_ID": "zw-worker-0c8e",
    "ZW_S3_SECRET_ACCESS_KEY": "worker-secret-7a19",
    "ZW_SECRET_KEY": "signing-key-3e5d",
    "FLOWER_BASIC_AUTH": "admin:flower-pw-84b0",
}
#: What may be published, all on 127.0.0.1: service -> container port (Flower, and what the
#: README says host-side clients need).
PUBLISHED = {"flower": 5555, "redis": 6379, "postgres": 5432, "minio": 9000}
ARTIFACT_BUCKET = "zw-artifacts"
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY|AUTH|TOKEN")
_VAR_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:[:?-][^}]*)?\}")
_COMPOSE_VAR = re.compile(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:(\$\{[^}]*\}|[^@\s/]*)@")


def _compose(
    *args: str, env: dict[str, str], env_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run docker-compose on COMPOSE_FILE; ``env_file`` replaces a developer's own ``.env``."""
    binary = require_binary("docker-compose")
    with tempfile.TemporaryDirectory() as tmp:
        if env_file is None:
            env_file = Path(tmp) / "empty.env"
            env_file.write_text("")
        return subprocess.run(
            [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _env_without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SECRETS}


def _load_yaml(text: str) -> Any:
    """Parse YAML with PyYAML, from this interpreter or else from docker-compose's own."""
    try:
        import yaml
    except ImportError:
        pass
    else:
        return yaml.safe_load(text)
    with open(require_binary("docker-compose"), "rb") as f:
        shebang = f.readline(300)
    if not shebang.startswith(b"#!"):
        service_unavailable("no YAML parser: install PyYAML or a Python docker-compose v1")
    result = subprocess.run(
        [
            *shebang[2:].decode().split(),
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def _config(*extra: str) -> dict[str, Any]:
    result = _compose("config", *extra, env=_env_without_secrets() | SECRETS)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = _load_yaml(result.stdout)
    return config


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """The compose config with SECRETS interpolated (anchors and merges resolved)."""
    return _config()


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The compose config as written: ``${VAR}`` references kept."""
    return _config("--no-interpolate")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _commands(service: dict[str, Any]) -> str:
    """Everything a service runs: entrypoint, command and health check, as one string."""
    parts = [service.get("entrypoint"), service.get("command")]
    parts.append((service.get("healthcheck") or {}).get("test"))
    return json.dumps(parts)


def test_docker_compose_config_is_valid() -> None:
    result = _compose("config", "-q", env=_env_without_secrets() | SECRETS)

    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_docker_compose_defines_every_service() -> None:
    result = _compose("config", "--services", env=_env_without_secrets() | SECRETS)

    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == EXPECTED_SERVICES


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_docker_compose_requires_each_secret(missing: str) -> None:
    env = _env_without_secrets() | {k: v for k, v in SECRETS.items() if k != missing}

    result = _compose("config", "-q", env=env)

    assert result.returncode != 0
    assert missing in result.stderr


def test_env_example_is_all_docker_compose_needs() -> None:
    result = _compose("config", "-q", env=_env_without_secrets(), env_file=ENV_EXAMPLE)

    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_env_example_names_every_compose_variable_with_a_comment() -> None:
    used = set(_COMPOSE_VAR.findall(COMPOSE_FILE.read_text()))
    lines = ENV_EXAMPLE.read_text().splitlines()
    listed = {}
    for i, line in enumerate(lines):
        if match := re.match(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line):
            listed[match[1]] = match[2]
            assert i > 0 and lines[i - 1].startswith("#"), f"{match[1]} has no comment above it"

    assert used == set(listed), f"missing: {used - set(listed)}, unused: {set(listed) - used}"
    assert "cp .env.example .env" in ENV_EXAMPLE.read_text()
    for name, value in listed.items():
        if _SECRET_NAME.search(name) and not name.endswith("_ID"):  # an access key id names a user
            assert "change-me" in value, f"{name} in .env.example is not a placeholder"


def test_docker_compose_publishes_only_flower_and_client_ports_on_loopback(
    rendered: dict[str, Any],
) -> None:
    published = {}
    for name, service in rendered["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip, target = port.get("host_ip", ""), int(port["target"])
            else:  # [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]
                parts = str(port).split("/")[0].split(":")
                host_ip, target = (parts[0] if len(parts) == 3 else ""), int(parts[-1])
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this host"
            published[name] = target

    assert published == PUBLISHED


def test_readme_names_the_published_client_ports() -> None:
    text = README.read_text()
    start = text.index("[`docker-compose.yml`](docker-compose.yml)")
    paragraph = text[start : text.index("\n## ", start)]

    assert ".env.example" in paragraph
    for port in PUBLISHED.values():
        assert f"127.0.0.1:{port}" in paragraph, f"the README does not name port {port}"


def test_redis_requires_its_password_everywhere(
    raw: dict[str, Any], rendered: dict[str, Any]
) -> None:
    redis = raw["services"]["redis"]
    password = SECRETS["ZW_REDIS_PASSWORD"]

    assert re.search(r'--requirepass "?\$\$ZW_REDIS_PASSWORD', " ".join(redis["command"]))
    assert "REDISCLI_AUTH" in json.dumps(redis["healthcheck"]["test"])
    assert _environment(rendered["services"]["redis"])["ZW_REDIS_PASSWORD"] == password
    urls = [
        _environment(service)["ZW_BROKER_URL"]
        for name, service in rendered["services"].items()
        if name not in {"redis", "postgres", "minio", "minio-init"}
    ]
    assert urls and set(urls) == {f"redis://:{password}@redis:6379/0"}


def test_docker_compose_has_no_literal_secret(
    raw: dict[str, Any], rendered: dict[str, Any]
) -> None:
    for name, service in raw["services"].items():
        for key, value in _environment(service).items():
            if _SECRET_NAME.search(key):
                assert _VAR_REF.fullmatch(value), f"{name}: {key} is not a ${{VAR}} reference"
    url_passwords = _URL_PASSWORD.findall(COMPOSE_FILE.read_text())
    assert len(url_passwords) >= 2  # the broker and the metadata URLs at least
    for password in url_passwords:
        assert _VAR_REF.fullmatch(password), f"a URL holds the literal password {password!r}"
    # Commands read secrets from their environment at run time; interpolated into a command
    # they would show up in `docker ps` and `docker inspect`.
    for name, service in rendered["services"].items():
        commands = _commands(service)
        leaked = [k for k, v in SECRETS.items() if v in commands or v.split(":")[-1] in commands]
        assert not leaked, f"{name} puts {leaked} on a command line"


def test_flower_gets_only_the_broker_and_its_log_in(rendered: dict[str, Any]) -> None:
    flower = rendered["services"]["flower"]

    assert set(_environment(flower)) == {"ZW_BROKER_URL", "FLOWER_BASIC_AUTH"}
    dumped = json.dumps(flower)
    others = [k for k, v in SECRETS.items() if v in dumped]
    assert sorted(others) == ["FLOWER_BASIC_AUTH", "ZW_REDIS_PASSWORD"]
    assert flower["entrypoint"][:2] == ["zw", "flower"]  # which refuses to start without a log-in


def test_minio_root_credentials_stay_in_minio(rendered: dict[str, Any]) -> None:
    root = {SECRETS["ZW_MINIO_ROOT_USER"], SECRETS["ZW_MINIO_ROOT_PASSWORD"]}
    holders = {
        name
        for name, service in rendered["services"].items()
        if any(value in json.dumps(service) for value in root)
    }

    assert holders == {"minio", "minio-init"}
    worker_env = _environment(rendered["services"]["worker-cpu"])
    assert worker_env["ZW_S3_ACCESS_KEY_ID"] == SECRETS["ZW_S3_ACCESS_KEY_ID"]
    assert worker_env["ZW_ARTIFACT_URI"].startswith(f"s3://{ARTIFACT_BUCKET}/")


def test_minio_init_creates_a_user_allowed_only_the_artifact_bucket(
    rendered: dict[str, Any],
) -> None:
    script = _commands(rendered["services"]["minio-init"])
    policy_json = re.search(r"POLICY='(\{.*?\})'", json.loads(script)[0][2])

    for command in ("mc admin policy create", "mc admin user add", "mc admin policy attach"):
        assert command in script
    assert policy_json is not None, "no inline POLICY='{...}' in minio-init"
    policy = json.loads(policy_json[1])
    bucket_arns = {f"arn:aws:s3:::{ARTIFACT_BUCKET}", f"arn:aws:s3:::{ARTIFACT_BUCKET}/*"}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement["Resource"]) <= bucket_arns
        assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"])


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bakes_in_no_credential(dockerfile: Path) -> None:
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        if line.split(None, 1)[:1] in (["ENV"], ["ARG"]):
            assert not _SECRET_NAME.search(line), f"{dockerfile.name}: {line}"
        assert not _URL_PASSWORD.search(line), f"{dockerfile.name}: {line}"


# -- zw flower ---------------------------------------------------------------------------------


@pytest.fixture()
def flower_exec(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, str]]]:
    """Run ``zw flower`` in-process with exec replaced by a recorder of (argv, env)."""
    for name in ("ZW_STACK_FILE", "FLOWER_BASIC_AUTH", "FLOWER_AUTH", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZW_BROKER_URL", "redis://:broker-pw-c0ffee@127.0.0.1:6379/0")
    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execvpe", lambda _file, argv, env: calls.append((argv, env)))
    return calls


def _zw(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_zw_flower_refuses_to_start_without_a_log_in(
    flower_exec: list[tuple[list[str], dict[str, str]]],
) -> None:
    code, output = _zw("flower")

    assert code == 2 and not flower_exec
    message = output.split("Error: ", 1)[1].strip()
    assert "FLOWER_BASIC_AUTH" in message and "--unauthenticated" in message
    assert ". " not in message and "\n" not in message  # one sentence


@pytest.mark.parametrize(
    "args",
    [
        ["--unauthenticated", "--address", "0.0.0.0"],
        ["--unauthenticated", "--", "--address=0.0.0.0"],
        ["--unauthenticated", "--basic-auth", "admin:pw"],
        ["--basic-auth", "no-colon"],
    ],
    ids=["wide-address", "wide-address-passed-through", "both", "malformed"],
)
def test_zw_flower_refuses_unsafe_or_contradictory_options(
    flower_exec: list[tuple[list[str], dict[str, str]]], args: list[str]
) -> None:
    code, output = _zw("flower", *args)

    assert code == 2 and not flower_exec
    assert "Error: " in output
    assert "no-colon" not in output and "admin:pw" not in output


@pytest.mark.parametrize(
    "args",
    [
        ["--basic-auth", "admin:flower-pw-1", "--", "--max_tasks=100"],
        ["--", "--basic_auth=admin:flower-pw-1", "--max_tasks=100"],
        ["--", "--basic-auth", "admin:flower-pw-1", "--max_tasks=100"],
    ],
    ids=["option", "passed-through", "passed-through-two-tokens"],
)
def test_zw_flower_hands_secrets_over_in_the_environment(
    flower_exec: list[tuple[list[str], dict[str, str]]], args: list[str]
) -> None:
    code, output = _zw("flower", "--port", "5601", *args)

    assert code == 0, output
    ((argv, env),) = flower_exec
    assert "broker-pw-c0ffee" not in " ".join(argv) and "flower-pw-1" not in " ".join(argv)
    assert argv[-4:] == ["flower", "--port=5601", "--address=127.0.0.1", "--max_tasks=100"]
    assert env["CELERY_BROKER_URL"] == "redis://:broker-pw-c0ffee@127.0.0.1:6379/0"
    assert env["FLOWER_BASIC_AUTH"] == "admin:flower-pw-1"


def test_zw_flower_unauthenticated_on_loopback_starts(
    flower_exec: list[tuple[list[str], dict[str, str]]],
) -> None:
    code, output = _zw("flower", "--unauthenticated", "--address", "localhost")

    assert code == 0, output
    ((argv, env),) = flower_exec
    assert "--address=localhost" in argv and "FLOWER_BASIC_AUTH" not in env


def _start_redis_with_password(workdir: Path, password: str) -> tuple[ServiceProcess, int]:
    """redis-server with ``requirepass`` in a 0600 config file, so not in its own argv."""
    import redis

    binary = require_binary("redis-server")
    port = free_port()
    config = workdir / "redis.conf"
    config.touch(mode=0o600)
    config.write_text(
        f'bind 127.0.0.1\nport {port}\nrequirepass {password}\ndir {workdir}\nsave ""\n'
        "appendonly no\ndaemonize no\n"
    )
    process = ServiceProcess("redis-server", [binary, str(config)], log_path=workdir / "redis.log")
    process.start()

    def ping() -> bool:
        with redis.Redis("127.0.0.1", port, password=password, socket_timeout=1) as client:
            return bool(client.ping())

    try:
        process.wait_until(ping, 15, "redis PING with the password")
    except BaseException:
        process.stop()
        raise
    return process, port


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def _command_lines() -> Iterator[tuple[int, str]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:  # the process exited meanwhile
                continue


@pytest.mark.services
def test_zw_flower_on_a_password_redis_hides_both_passwords_from_ps(tmp_path: Path) -> None:
    import redis

    redis_password, flower_password = secrets.token_hex(16), secrets.token_hex(16)
    redis_server, redis_port = _start_redis_with_password(tmp_path, redis_password)
    try:
        with (
            pytest.raises(redis.AuthenticationError),
            redis.Redis("127.0.0.1", redis_port) as client,
        ):
            client.ping()
        port = free_port()
        env = {"ZW_BROKER_URL": f"redis://:{redis_password}@127.0.0.1:{redis_port}/0"}
        flower = ServiceProcess(
            "zw flower",
            [sys.executable, "-m", "zenml_workers.cli", "flower", "--port", str(port)]
            + ["--basic-auth", f"admin:{flower_password}"],
            log_path=tmp_path / "flower.log",
            env=service_env(env, drop_prefixes=("ZW_", "FLOWER_", "CELERY_")),
            cwd=REPO_ROOT,
        ).start()
        try:
            base = f"http://127.0.0.1:{port}"
            flower.wait_until(lambda: _get(f"{base}/healthcheck") == 200, 60, "GET /healthcheck")
            login = ("admin", flower_password)

            assert _get(f"{base}/api/workers") == 401
            assert _get(f"{base}/api/workers", auth=("admin", "wrong")) == 401
            assert _get(f"{base}/api/workers", auth=login) == 200
            # Read from Redis itself: 200 only when Flower got the broker password.
            assert _get(f"{base}/api/queues/length", auth=login) == 200
            flower_cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes().split(b"\0")
            assert b"celery" in flower_cmdline  # zw has exec'd Flower in the same process
            leaks = [
                (pid, cmd)
                for pid, cmd in _command_lines()
                if redis_password in cmd or flower_password in cmd
            ]
            assert not leaks
            assert redis_password not in flower.log_text()
            assert flower_password not in flower.log_text()
        finally:
            flower.stop()
    finally:
        redis_server.stop()
