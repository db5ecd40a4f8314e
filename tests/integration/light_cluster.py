"""A light cluster for the stop tests, the Flower states test and ``bench/stop.py``: one Redis
database, the metadata store in a SQLite file and artifacts in a folder on this machine
(what README's "try it on one machine" runs), and ``zw worker`` processes started as an
operator starts them. Nothing here needs pytest.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.services.process import (
    REPO_ROOT,
    TEST_SECRET_KEY,
    ServiceProcess,
    service_env,
    settings_from_env,
    wait_until,
)

READY_TIMEOUT_S = 60.0
#: Queues the cluster's steps may name; ``drain`` is for workers a test shuts down.
QUEUES = "cpu,gpu,drain"
#: Short stop timing: a step that ignores a stop is killed after 1 s.
STOP_TIMING = {
    "ZW_STOP_GRACE_S": "1",
    "ZW_STOP_CHECK_INTERVAL_S": "0.2",
    "ZW_SHUTDOWN_GRACE_S": "20",
    "ZW_HEARTBEAT_INTERVAL_S": "1",
    "ZW_WORKER_TTL_S": "10",
    "ZW_LEASE_S": "30",
}


@dataclass
class LightCluster:
    """The cluster's settings, and the ``zw worker`` processes started so far."""

    root: Path
    env: dict[str, str]
    workers: list[ServiceProcess] = field(default_factory=list)
    _metadata: Any = None

    def start_worker(
        self,
        name: str,
        *,
        queues: str = "cpu",
        pool: str = "prefork",
        concurrency: int = 2,
        env: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        """``zw worker`` (``--skip-gpu-check`` for the gpu queue, ``CUDA_VISIBLE_DEVICES`` set
        as a GPU machine's supervisor would); returns once Celery says it is ready."""
        argv = [
            sys.executable, "-m", "zenml_workers.cli", "worker",
            "--queues", queues, "--pool", pool, "--hostname", name, "--loglevel", "INFO",
        ]  # fmt: skip
        if pool != "solo":
            argv += ["--concurrency", str(concurrency)]
        if "gpu" in queues.split(","):
            argv.append("--skip-gpu-check")
        proc = ServiceProcess(
            f"zw worker {name}",
            argv,
            log_path=self.root / f"worker-{name.replace('@', '_')}-{uuid.uuid4().hex[:6]}.log",
            env=service_env(
                {**self.env, "CUDA_VISIBLE_DEVICES": "0", **(env or {})}, drop_prefixes=("ZW_",)
            ),
            cwd=REPO_ROOT,
        ).start()
        try:
            proc.wait_for_log(" ready.", READY_TIMEOUT_S)
        except BaseException:
            proc.stop()
            raise
        self.workers.append(proc)
        return proc

    def settings(self, **overrides: Any) -> Any:
        return settings_from_env(self.env, **overrides)

    @property
    def metadata(self) -> Any:
        from stores.metadata.store import MetadataStore

        if self._metadata is None:
            self._metadata = MetadataStore(self.env["ZW_METADATA_URL"])
        return self._metadata

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop(timeout_s=10)
        self.workers.clear()
        if self._metadata is not None:
            self._metadata.dispose()


def start_light_cluster(
    root: Path, broker_url: str, *, timing: Mapping[str, str] = STOP_TIMING
) -> LightCluster:
    """The cluster's settings on ``broker_url`` (a Redis database of its own), with its SQLite
    store migrated; no worker yet."""
    from stores.metadata.store import MetadataStore

    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'metadata.db'}"
    store = MetadataStore(url)
    store.migrate()
    store.dispose()
    env = {
        "ZW_BROKER_URL": broker_url,
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_METADATA_URL": url,
        "ZW_ARTIFACT_URI": str(root / "artifacts"),
        "ZW_QUEUES": QUEUES,
        "ZW_HOME": str(root / "home"),
        **timing,
    }
    return LightCluster(root=root, env=env)


def _markers(marker_dir: Path, prefix: str) -> list[Path]:
    return sorted(marker_dir.glob(f"{prefix}-*-*"), key=lambda p: p.name.rsplit("-", 2)[1])


def marker_pids(marker_dir: Path, prefix: str) -> list[int]:
    """Pids from the ``<prefix>-<n>-<pid>`` markers a step of ``tests.pipelines.stopping``
    wrote (e.g. ``pid-h``, ``interrupted-h``), oldest first."""
    return [int(p.name.rsplit("-", 1)[1]) for p in _markers(marker_dir, prefix)]


def marker_texts(marker_dir: Path, prefix: str) -> list[str]:
    """What those markers say (an ``interrupted`` one: the exception's type), oldest first."""
    return [p.read_text() for p in _markers(marker_dir, prefix)]


def wait_for_marker(marker_dir: Path, prefix: str, timeout_s: float = 60.0, count: int = 1) -> int:
    """The pid in the ``count``-th ``<prefix>-<pid>`` marker, once it exists."""
    wait_until(
        lambda: len(marker_pids(marker_dir, prefix)) >= count,
        timeout_s,
        f"marker {prefix} #{count} in {marker_dir}",
    )
    return marker_pids(marker_dir, prefix)[count - 1]
