"""What a run needs to be reproduced: Python, packages, platform and the code's git state.

Captured once per process (package metadata and ``git`` are slow next to a
step), then reused by every run that process submits.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def packages() -> dict[str, str]:
    """Installed distributions as ``{name: version}`` (no ``pip freeze`` subprocess)."""
    from importlib.metadata import distributions

    out: dict[str, str] = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name:
            out[name.lower()] = dist.version
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=1)
def system() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "executable": sys.executable,
    }


@functools.lru_cache(maxsize=64)
def git_state(directory: str) -> dict[str, Any]:
    """Commit, branch and dirty flag of the git checkout holding ``directory`` ({} outside git)."""
    path = Path(directory).resolve()
    root = next((p for p in (path, *path.parents) if (p / ".git").exists()), None)
    if root is None:
        return {}
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain=v2",
                "--branch",
                "--untracked-files=no",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"root": str(root)}
    state: dict[str, Any] = {"root": str(root), "dirty": False}
    for line in out.splitlines():
        if line.startswith("# branch.oid "):
            oid = line.split()[-1]
            state["commit"] = None if oid == "(initial)" else oid
        elif line.startswith("# branch.head "):
            state["branch"] = line.split()[-1]
        elif not line.startswith("#"):
            state["dirty"] = True
    return state


def capture(code_dir: str | None) -> dict[str, Any]:
    """The environment record stored on a run."""
    return {
        "system": system(),
        "packages": packages(),
        "git": git_state(code_dir) if code_dir else {},
    }
