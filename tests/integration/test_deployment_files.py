"""The deployment files are valid and locked down, without a Docker engine.

Compose config and Dockerfile lint; every secret comes from ``.env`` (``.env.example`` lists
every variable of both compose files); only Flower and the client ports the README names are
published, on 127.0.0.1 unless ``ZW_PUBLISH_ADDRESS`` says otherwise (Flower always); Flower
gets the broker and nothing else; MinIO's root stays in MinIO. The workers-only file gives
remote workers what the central workers get, plus TLS files, and no port. The images install
what the quickstart imports, take the team's packages and code, and run as a non-root user.
And ``zw flower`` refuses to run without a log-in and keeps the broker password and the log-in
out of ``ps``.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.services.compose import (
    compose,
    load_yaml,
    required_variables,
    service_environment,
    variables,
)
from tests.services.process import (
    REPO_ROOT,
    ServiceProcess,
    free_port,
    require_binary,
    service_env,
)
from zenml_workers.cli import cli

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
WORKERS_COMPOSE_FILE = REPO_ROOT / "docker-compose.workers.yml"
COMPOSE_FILES = (COMPOSE_FILE, WORKERS_COMPOSE_FILE)
ENV_EXAMPLE = REPO_ROOT / ".env.example"
README = REPO_ROOT / "README.md"
DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILES = sorted([*DOCKER_DIR.glob("*.Dockerfile"), *DOCKER_DIR.glob("examples/*.Dockerfile")])
WORKER_DOCKERFILES = [DOCKER_DIR / "worker.Dockerfile", DOCKER_DIR / "worker-gpu.Dockerfile"]
TEAM_EXAMPLE = DOCKER_DIR / "examples" / "team-worker.Dockerfile"
QUICKSTART = REPO_ROOT / "examples" / "quickstart.py"
EXPECTED_SERVICES = {
    "redis",
    "postgres",
    "minio",
    "minio-init",
    "scheduler",
    "worker-cpu",
    "worker-gpu",
    "worker-gpu-on-cpu",
    "flower",
}
EXPECTED_WORKER_VM_SERVICES = {"worker-cpu", "worker-gpu"}
#: Recognisable stand-ins for every variable the central compose file needs.
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
#: What a worker VM's .env holds: the shared secrets and where it runs and connects.
WORKER_VM_VALUES = {
    **{
        k: v
        for k, v in SECRETS.items()
        if k not in {"ZW_MINIO_ROOT_USER", "ZW_MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH"}
    },
    "ZW_CENTRAL_HOST": "zw-central.example.internal",
    "ZW_WORKER_HOSTNAME": "vm-7",
}
#: What may be published, all on 127.0.0.1 by default: service -> container port (Flower, and
#: what the README says clients and remote workers need).
PUBLISHED = {"flower": 5555, "redis": 6379, "postgres": 5432, "minio": 9000}
#: Published on ZW_PUBLISH_ADDRESS when it is set (documentation address: no traffic goes there).
PUBLISH_ADDRESS = "192.0.2.10"
#: The settings of README "Encrypted links" that name files; a remote worker takes each.
TLS_VARIABLES = {
    "ZW_BROKER_CA_FILE",
    "ZW_BROKER_CERT_FILE",
    "ZW_BROKER_KEY_FILE",
    "ZW_METADATA_CA_FILE",
    "ZW_METADATA_CERT_FILE",
    "ZW_METADATA_KEY_FILE",
    "ZW_S3_CA_BUNDLE",
}
TLS_MOUNT = "/etc/zenml-workers/tls"
ARTIFACT_BUCKET = "zw-artifacts"
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY|AUTH|TOKEN")
_VAR_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:[:?-][^}]*)?\}")
_URL_PASSWORD = re.compile(r"(?:[a-z][a-z0-9+.-]*|\$\{[^}]*\})://[^/@\s:]*:(\$\{[^}]*\}|[^@\s/]*)@")


def _env_without(*names: str) -> dict[str, str]:
    """``os.environ`` less the compose variables, so a developer's shell cannot stand in."""
    used = set(names).union(*(variables(f) for f in COMPOSE_FILES))
    return {k: v for k, v in os.environ.items() if k not in used}


def _compose_values(compose_file: Path) -> dict[str, str]:
    return dict(SECRETS) if compose_file == COMPOSE_FILE else dict(WORKER_VM_VALUES)


def _config(compose_file: Path, *extra: str, **values: str) -> dict[str, Any]:
    env = _env_without() | _compose_values(compose_file) | values
    result = compose(compose_file, "config", *extra, env=env)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = load_yaml(result.stdout)
    return config


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """The central compose config with SECRETS interpolated (anchors and merges resolved)."""
    return _config(COMPOSE_FILE)


def _as_written(compose_file: Path) -> dict[str, Any]:
    """The compose file as written: ``${VAR}`` references kept, YAML anchors and merges resolved.

    (``config --no-interpolate`` would refuse a port or volume that is a ``${VAR}``.)
    """
    config: dict[str, Any] = load_yaml(compose_file.read_text())
    return config


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The central compose file as written."""
    return _as_written(COMPOSE_FILE)


@pytest.fixture(scope="module")
def workers() -> dict[str, Any]:
    """The workers-only config with a worker VM's values."""
    return _config(WORKERS_COMPOSE_FILE)


def _commands(service: dict[str, Any]) -> str:
    """Everything a service runs: entrypoint, command and health check, as one string."""
    parts = [service.get("entrypoint"), service.get("command")]
    parts.append((service.get("healthcheck") or {}).get("test"))
    return json.dumps(parts)


def _published(config: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """service -> (host address, host port, container port) of every published port."""
    published = {}
    for name, service in config["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip", "")
                host_port, target = int(port["published"]), int(port["target"])
            else:  # [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]
                parts = str(port).split("/")[0].split(":")
                host_ip = parts[0] if len(parts) == 3 else ""
                host_port, target = int(parts[-2] if len(parts) > 1 else parts[-1]), int(parts[-1])
            assert name not in published, f"{name} publishes more than one port"
            published[name] = (host_ip, host_port, target)
    return published


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_config_is_valid(compose_file: Path) -> None:
    env = _env_without() | _compose_values(compose_file)
    result = compose(compose_file, "config", "-q", env=env)

    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("compose_file", "expected"),
    [(COMPOSE_FILE, EXPECTED_SERVICES), (WORKERS_COMPOSE_FILE, EXPECTED_WORKER_VM_SERVICES)],
    ids=lambda v: v.name if isinstance(v, Path) else "",
)
def test_docker_compose_defines_every_service(compose_file: Path, expected: set[str]) -> None:
    env = _env_without() | _compose_values(compose_file)
    result = compose(compose_file, "config", "--services", env=env)

    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == expected


@pytest.mark.parametrize(
    ("compose_file", "missing"),
    [
        *((COMPOSE_FILE, name) for name in sorted(SECRETS)),
        *(
            (WORKERS_COMPOSE_FILE, name)
            for name in sorted(required_variables(WORKERS_COMPOSE_FILE))
        ),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_docker_compose_requires_each_secret(compose_file: Path, missing: str) -> None:
    values = {k: v for k, v in _compose_values(compose_file).items() if k != missing}

    result = compose(compose_file, "config", "-q", env=_env_without() | values)

    assert result.returncode != 0
    assert missing in result.stderr


def test_workers_compose_requires_the_secrets_and_where_to_connect() -> None:
    required = required_variables(WORKERS_COMPOSE_FILE)

    assert required == set(WORKER_VM_VALUES)
    assert not required & {"ZW_MINIO_ROOT_USER", "ZW_MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH"}


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_env_example_is_all_docker_compose_needs(compose_file: Path) -> None:
    result = compose(compose_file, "config", "-q", env=_env_without(), env_file=ENV_EXAMPLE)

    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_env_example_names_every_compose_variable_with_a_comment() -> None:
    used = variables(COMPOSE_FILE) | variables(WORKERS_COMPOSE_FILE)
    lines = ENV_EXAMPLE.read_text().splitlines()
    listed = {}
    for i, line in enumerate(lines):
        if match := re.match(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line):
            listed[match[1]] = match[2]
            assert i > 0 and lines[i - 1].startswith("#"), f"{match[1]} has no comment above it"

    assert used == set(listed), f"missing: {used - set(listed)}, unused: {set(listed) - used}"
    assert "cp .env.example .env" in ENV_EXAMPLE.read_text()
    for name, value in listed.items():
        # An access key id names a user; a *_FILE setting names a path, not the secret itself.
        if _SECRET_NAME.search(name) and not name.endswith(("_ID", "_FILE")):
            assert "change-me" in value, f"{name} in .env.example is not a placeholder"
    assert listed["ZW_PUBLISH_ADDRESS"] == "127.0.0.1"


def test_docker_compose_publishes_only_flower_and_client_ports_on_loopback(
    rendered: dict[str, Any],
) -> None:
    published = _published(rendered)

    assert {name: target for name, (_, _, target) in published.items()} == PUBLISHED
    assert {ip for ip, _, _ in published.values()} == {"127.0.0.1"}
    assert all(host_port == target for _, host_port, target in published.values())


def test_docker_compose_publishes_the_client_ports_on_the_chosen_address() -> None:
    config = _config(
        COMPOSE_FILE,
        ZW_PUBLISH_ADDRESS=PUBLISH_ADDRESS,
        ZW_REDIS_PORT="16379",
        ZW_POSTGRES_PORT="15432",
        ZW_S3_PORT="19000",
    )

    assert _published(config) == {
        "flower": ("127.0.0.1", 5555, 5555),  # basic auth over plain HTTP: never wider
        "redis": (PUBLISH_ADDRESS, 16379, 6379),
        "postgres": (PUBLISH_ADDRESS, 15432, 5432),
        "minio": (PUBLISH_ADDRESS, 19000, 9000),
    }


def test_readme_names_the_published_client_ports() -> None:
    text = README.read_text()
    start = text.index("[`docker-compose.yml`](docker-compose.yml)")
    paragraph = text[start : text.index("\n## ", start)]

    assert ".env.example" in paragraph
    for port in PUBLISHED.values():
        assert f"127.0.0.1:{port}" in paragraph, f"the README does not name port {port}"
    for name in ("ZW_PUBLISH_ADDRESS", "docker-compose.workers.yml", "ZW_CENTRAL_HOST"):
        assert name in paragraph, f"the README does not say how workers on other VMs join ({name})"
    for name in ("TEAM_REQUIREMENTS", "TEAM_CODE", "EXTRAS", TEAM_EXAMPLE.name):
        assert name in paragraph, f"the README does not say how a team builds its image ({name})"


def test_redis_requires_its_password_everywhere(
    raw: dict[str, Any], rendered: dict[str, Any], workers: dict[str, Any]
) -> None:
    redis = raw["services"]["redis"]
    password = SECRETS["ZW_REDIS_PASSWORD"]

    assert re.search(r'--requirepass "?\$\$ZW_REDIS_PASSWORD', " ".join(redis["command"]))
    assert "REDISCLI_AUTH" in json.dumps(redis["healthcheck"]["test"])
    assert service_environment(rendered["services"]["redis"])["ZW_REDIS_PASSWORD"] == password
    urls = [
        service_environment(service)["ZW_BROKER_URL"]
        for name, service in rendered["services"].items()
        if name not in {"redis", "postgres", "minio", "minio-init"}
    ]
    assert urls and set(urls) == {f"redis://:{password}@redis:6379/0"}
    remote = {service_environment(s)["ZW_BROKER_URL"] for s in workers["services"].values()}
    assert remote == {f"redis://:{password}@{WORKER_VM_VALUES['ZW_CENTRAL_HOST']}:6379/0"}


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_has_no_literal_secret(compose_file: Path) -> None:
    raw = _as_written(compose_file)
    rendered = _config(compose_file)
    for name, service in raw["services"].items():
        for key, value in service_environment(service).items():
            if _SECRET_NAME.search(key):
                assert _VAR_REF.fullmatch(value), f"{name}: {key} is not a ${{VAR}} reference"
    url_passwords = _URL_PASSWORD.findall(compose_file.read_text())
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

    assert set(service_environment(flower)) == {"ZW_BROKER_URL", "FLOWER_BASIC_AUTH"}
    dumped = json.dumps(flower)
    others = [k for k, v in SECRETS.items() if v in dumped]
    assert sorted(others) == ["FLOWER_BASIC_AUTH", "ZW_REDIS_PASSWORD"]
    assert flower["entrypoint"][:2] == ["zw", "flower"]  # which refuses to start without a log-in


def test_minio_root_credentials_stay_in_minio(
    rendered: dict[str, Any], workers: dict[str, Any]
) -> None:
    root = {SECRETS["ZW_MINIO_ROOT_USER"], SECRETS["ZW_MINIO_ROOT_PASSWORD"]}
    holders = {
        name
        for name, service in rendered["services"].items()
        if any(value in json.dumps(service) for value in root)
    }

    assert holders == {"minio", "minio-init"}
    assert not variables(WORKERS_COMPOSE_FILE) & {"ZW_MINIO_ROOT_USER", "ZW_MINIO_ROOT_PASSWORD"}
    for service in (rendered["services"]["worker-cpu"], *workers["services"].values()):
        worker_env = service_environment(service)
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


# -- workers on other VMs (docker-compose.workers.yml) ----------------------------------------


def test_remote_workers_get_what_central_workers_get_plus_tls_and_nothing_else(
    rendered: dict[str, Any], workers: dict[str, Any]
) -> None:
    central = service_environment(rendered["services"]["worker-cpu"])
    for name, service in workers["services"].items():
        remote = service_environment(service)

        assert set(remote) == set(central) | TLS_VARIABLES, name
        for key in (
            "ZW_ARTIFACT_URI",
            "ZW_S3_ACCESS_KEY_ID",
            "ZW_S3_SECRET_ACCESS_KEY",
            "ZW_SECRET_KEY",
        ):
            assert remote[key] == central[key], (name, key)
        assert {remote[k] for k in TLS_VARIABLES} == {""}, "TLS files are opt-in"
        central_host = WORKER_VM_VALUES["ZW_CENTRAL_HOST"]
        assert f"@{central_host}:5432/" in remote["ZW_METADATA_URL"]
        assert remote["ZW_S3_ENDPOINT_URL"] == f"http://{central_host}:9000"


def test_remote_workers_listen_nowhere_and_depend_on_no_local_service(
    workers: dict[str, Any],
) -> None:
    assert _published(workers) == {}
    for name, service in workers["services"].items():
        assert "depends_on" not in service, name
        assert "build" not in service, f"{name}: a VM runs the team's image, it builds nothing"
        assert service["hostname"] == WORKER_VM_VALUES["ZW_WORKER_HOSTNAME"]
        assert service["restart"] == "unless-stopped"


def test_remote_workers_mount_tls_files_read_only_and_take_their_paths() -> None:
    paths = {name: f"{TLS_MOUNT}/{name.lower()}.pem" for name in TLS_VARIABLES}
    config = _config(
        WORKERS_COMPOSE_FILE,
        ZW_TLS_DIR="/srv/zw-tls",
        ZW_BROKER_SCHEME="rediss",
        ZW_S3_SCHEME="https",
        ZW_REDIS_PORT="6380",
        **paths,
    )

    for name, service in config["services"].items():
        assert f"/srv/zw-tls:{TLS_MOUNT}:ro" in service["volumes"], name
        env = service_environment(service)
        assert {k: env[k] for k in TLS_VARIABLES} == paths
        assert env["ZW_BROKER_URL"].startswith("rediss://:")
        assert env["ZW_BROKER_URL"].endswith(":6380/0")
        assert env["ZW_S3_ENDPOINT_URL"].startswith("https://")


def test_remote_gpu_worker_reserves_an_nvidia_gpu_and_the_cpu_worker_none(
    workers: dict[str, Any],
) -> None:
    gpu, cpu = workers["services"]["worker-gpu"], workers["services"]["worker-cpu"]

    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["profiles"] == ["gpu"]
    assert "deploy" not in cpu and "profiles" not in cpu
    assert cpu["command"][:2] == ["--queues", "cpu"] and gpu["command"][:2] == ["--queues", "gpu"]


def test_remote_worker_images_default_to_the_images_docker_compose_builds(
    rendered: dict[str, Any], workers: dict[str, Any]
) -> None:
    for name in ("worker-cpu", "worker-gpu"):
        assert workers["services"][name]["image"] == rendered["services"][name]["image"]
    team = _config(WORKERS_COMPOSE_FILE, ZW_WORKER_IMAGE="registry.example.com/ml/zw-worker:3")
    assert team["services"]["worker-cpu"]["image"] == "registry.example.com/ml/zw-worker:3"


# -- images ------------------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint() -> None:
    binary = require_binary("hadolint")
    names = {path.name for path in DOCKERFILES}
    assert {"worker.Dockerfile", "worker-gpu.Dockerfile", "scheduler.Dockerfile"} <= names
    assert TEAM_EXAMPLE in DOCKERFILES

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


def test_dockerignore_keeps_secrets_and_keys_out_of_build_contexts() -> None:
    patterns = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }

    assert {".env", ".env.*", "tls", "**/*.key", "**/*.pem", ".git", ".venv"} <= patterns
    assert not any(p.startswith("!") for p in patterns), "an exception lets a secret back in"


def _instructions(dockerfile: Path, keyword: str) -> list[str]:
    """Arguments of each ``keyword`` instruction, continuation lines joined."""
    lines = dockerfile.read_text().replace("\\\n", " ").splitlines()
    return [line.split(None, 1)[1] for line in lines if line.split(None, 1)[:1] == [keyword]]


def _args(dockerfile: Path) -> dict[str, str]:
    return dict(arg.partition("=")[::2] for arg in _instructions(dockerfile, "ARG"))


def _quickstart_extras() -> set[str]:
    """The extras of pyproject.toml that provide the quickstart's third-party imports."""
    tree = ast.parse(QUICKSTART.read_text())
    modules = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    third_party = modules - set(sys.stdlib_module_names) - {"zenml_workers", "__future__"}
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    providing = {
        module: {
            extra
            for extra, requirements in extras.items()
            if any(re.match(rf"{module}\b", r) for r in requirements)
        }
        for module in third_party
    }
    missing = [module for module, found in providing.items() if not found]
    assert not missing, f"no extra of pyproject.toml provides {missing}"
    return {min(found) for found in providing.values()}


@pytest.mark.parametrize("dockerfile", WORKER_DOCKERFILES, ids=lambda p: p.name)
def test_worker_image_installs_what_the_quickstart_imports(dockerfile: Path) -> None:
    needed = _quickstart_extras()
    extras = set(_args(dockerfile)["EXTRAS"].split(","))

    assert {"numpy", "pandas"} <= needed  # the parse found the quickstart's imports
    assert needed | {"postgres"} <= extras
    (install,) = [r for r in _instructions(dockerfile, "RUN") if "pip install" in r]
    assert '".[${EXTRAS}]"' in install and "-r /opt/zw-team-requirements.txt" in install
    assert "pip check" in install


@pytest.mark.parametrize("dockerfile", WORKER_DOCKERFILES, ids=lambda p: p.name)
def test_worker_image_takes_the_teams_requirements_and_code(dockerfile: Path) -> None:
    args = _args(dockerfile)
    copies = _instructions(dockerfile, "COPY")

    assert (REPO_ROOT / args["TEAM_REQUIREMENTS"]).is_file()
    assert (REPO_ROOT / args["TEAM_CODE"]).is_dir()
    assert "${TEAM_REQUIREMENTS} /opt/zw-team-requirements.txt" in copies
    assert copies[-1] == "${TEAM_CODE} /opt/zw-team/"  # last: code changes need no reinstall
    assert "PYTHONPATH=/opt/zw-team" in " ".join(_instructions(dockerfile, "ENV"))


def _node_prefix(argv: list[str]) -> str:
    """``cpu`` of ``--hostname cpu@%h`` in a worker's arguments."""
    return argv[argv.index("--hostname") + 1].partition("@")[0]


@pytest.mark.parametrize("dockerfile", WORKER_DOCKERFILES, ids=lambda p: p.name)
def test_worker_image_runs_zw_worker_and_checks_its_own_node(dockerfile: Path) -> None:
    (entrypoint,) = _instructions(dockerfile, "ENTRYPOINT")
    (cmd,) = _instructions(dockerfile, "CMD")
    (healthcheck,) = _instructions(dockerfile, "HEALTHCHECK")

    assert json.loads(entrypoint) == ["zw", "worker"]
    prefix = _node_prefix(json.loads(cmd))
    assert f"-d {prefix}@$HOSTNAME" in healthcheck


def test_worker_services_name_the_node_their_health_check_pings(
    rendered: dict[str, Any], workers: dict[str, Any]
) -> None:
    """A service's --hostname prefix is the one its image's (or its own) health check pings."""
    images = {
        "zenml-workers-worker:0.1.0": DOCKER_DIR / "worker.Dockerfile",
        "zenml-workers-worker-gpu:0.1.0": DOCKER_DIR / "worker-gpu.Dockerfile",
    }
    services = [
        *((n, s) for n, s in rendered["services"].items() if n.startswith("worker-")),
        *workers["services"].items(),
    ]
    for name, service in services:
        if "command" in service:
            prefix = _node_prefix(service["command"])
        else:
            (cmd,) = _instructions(images[service["image"]], "CMD")
            prefix = _node_prefix(json.loads(cmd))
        if "healthcheck" in service:  # compose writes a literal $ as $$
            check = json.dumps(service["healthcheck"]["test"]).replace("$$", "$")
        else:
            (check,) = _instructions(images[service["image"]], "HEALTHCHECK")
        assert f"-d {prefix}@$HOSTNAME" in check, name


def test_team_example_builds_on_the_worker_image() -> None:
    (base,) = _instructions(TEAM_EXAMPLE, "FROM")
    text = TEAM_EXAMPLE.read_text()

    assert base == "zenml-workers-worker:0.1.0"
    assert "docker build -f docker/worker.Dockerfile -t zenml-workers-worker:0.1.0 ." in text
    assert "/opt/zw-team/" in " ".join(_instructions(TEAM_EXAMPLE, "COPY"))
    assert "pip check" in " ".join(_instructions(TEAM_EXAMPLE, "RUN"))
    assert not _instructions(TEAM_EXAMPLE, "ENTRYPOINT"), "the base image's entrypoint stays"


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
