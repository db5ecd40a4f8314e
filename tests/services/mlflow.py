"""A real ``mlflow server`` on a loopback port: SQLite backend store, local artifact root."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.services.process import (
    SETUP_HINT,
    ControlledService,
    ServiceProcess,
    ServiceUnavailableError,
    find_binary,
    fixture,
    free_port,
    serve,
    service_env,
)

if TYPE_CHECKING:
    import pytest

#: MLflow 3 imports a lot before it listens (about 10 s on a busy 2-core machine).
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class MLflowServer(ControlledService):
    """A running ``mlflow server``; ``tracking_uri`` is what clients and workers are given."""

    tracking_uri: str
    port: int
    backend_store_uri: str
    artifact_root: Path
    process: ServiceProcess | None = field(default=None, repr=False, compare=False)

    def client(self) -> object:
        """An ``mlflow.tracking.MlflowClient`` of this server (imports mlflow)."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def stop(self) -> None:
        """Stop the server process (when this object started one)."""
        if self.process is not None:
            self.process.stop()


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310 - loopback
        return bool(response.status == 200)


def start_mlflow(workdir: Path, timeout_s: float = START_TIMEOUT_S) -> MLflowServer:
    """Start ``mlflow server`` with a SQLite store in ``workdir``; stop it with ``.stop()``.

    One uvicorn worker and no job runner (MLflow's huey consumers): the tests only need
    the tracking REST API.

    Raises:
        ServiceUnavailableError: when ``mlflow`` is not installed (the ``test`` extra has it).
        TimeoutError: when ``/health`` does not answer within ``timeout_s`` seconds (with its log).
    """
    binary = find_binary("mlflow")
    if binary is None:
        raise ServiceUnavailableError(f"`mlflow` was not found on PATH; {SETUP_HINT}.")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = f"sqlite:///{workdir / 'mlflow.db'}"
    artifacts = workdir / "artifacts"
    argv = [
        binary, "server",
        "--backend-store-uri", backend,
        "--default-artifact-root", str(artifacts),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = service_env(
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, drop_prefixes=("ZW_", "MLFLOW_")
    )
    process = ServiceProcess(
        "mlflow server", argv, log_path=workdir / "mlflow.log", env=env, cwd=workdir
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until(lambda: _healthy(url), timeout_s, "mlflow server /health")
    except BaseException:
        process.stop()
        raise
    return MLflowServer(
        tracking_uri=url,
        port=port,
        backend_store_uri=backend,
        artifact_root=artifacts,
        process=process,
    )


@fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLflowServer]:
    """Start one ``mlflow server`` (SQLite backend) for the test session and stop it afterwards.

    Fails in CI and skips elsewhere when ``mlflow`` is not installed.
    """
    yield from serve(lambda: start_mlflow(tmp_path_factory.mktemp("mlflow")))
