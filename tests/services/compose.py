"""docker-compose (v1) without a Docker engine: render and check compose files.

``docker-compose config`` validates a file against the compose schema and prints it with
``${VAR}`` references interpolated and YAML anchors and merges resolved, which is exactly what
the containers would get. The deployment-file tests check that output; the multi-host test
runs workers with it, so the test and the file cannot drift. Nothing here needs pytest except
:func:`require_binary`'s skip or failure when ``docker-compose`` is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.services.process import REPO_ROOT, require_binary, service_unavailable

COMMAND_TIMEOUT_S = 60.0
#: A ``$VAR`` or ``${VAR...}`` reference (not an escaped ``$$``); group 1 is the name.
VARIABLE = re.compile(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_REQUIRED = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*):?\?")


def variables(compose_file: Path) -> set[str]:
    """Names of every variable ``compose_file`` references."""
    return set(VARIABLE.findall(compose_file.read_text()))


def required_variables(compose_file: Path) -> set[str]:
    """Names of the variables ``compose_file`` refuses to run without (``${VAR:?message}``)."""
    return set(_REQUIRED.findall(compose_file.read_text()))


def compose(
    compose_file: Path,
    *args: str,
    env: Mapping[str, str],
    env_file: Path | None = None,
    values: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose -f compose_file args...`` with exactly ``env`` as its environment.

    ``values`` are written to a temporary ``--env-file`` (as a ``.env`` would hold them);
    without them, ``env_file`` is used, or an empty file, so a developer's own ``.env`` never
    leaks in.

    Raises:
        pytest.fail.Exception, pytest.skip.Exception: ``docker-compose`` is missing (CI fails).
    """
    binary = require_binary("docker-compose")
    with tempfile.TemporaryDirectory() as tmp:
        if values is not None or env_file is None:
            env_file = Path(tmp) / "test.env"
            env_file.write_text("".join(f"{k}={v}\n" for k, v in (values or {}).items()))
        return subprocess.run(
            [binary, "--env-file", str(env_file), "-f", str(compose_file), *args],
            cwd=REPO_ROOT,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )


def environment_without(compose_file: Path) -> dict[str, str]:
    """``os.environ`` less every variable ``compose_file`` references.

    docker-compose prefers its own environment to the env file, so this keeps a variable of
    the caller's shell from standing in for a value the test chose.
    """
    used = variables(compose_file)
    return {k: v for k, v in os.environ.items() if k not in used}


def render(compose_file: Path, values: Mapping[str, str]) -> dict[str, Any]:
    """The config of ``compose_file`` with only ``values`` interpolated, as a dict.

    Raises:
        AssertionError: when docker-compose refuses the file or the values (with its message).
    """
    result = compose(compose_file, "config", env=environment_without(compose_file), values=values)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = load_yaml(result.stdout)
    return config


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A rendered service's ``environment`` as a dict (compose allows a list or a mapping)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def load_yaml(text: str) -> Any:
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
        timeout=COMMAND_TIMEOUT_S,
        check=True,
    )
    return json.loads(result.stdout)
