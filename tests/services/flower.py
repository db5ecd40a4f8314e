"""A real Flower monitor process, for tests that check what operators see."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.services.process import REPO_ROOT, ServiceProcess, fixture, free_port, service_env

START_TIMEOUT_S = 60.0
DEFAULT_APP = "zenml_workers.worker"


@dataclass(frozen=True)
class FlowerServer:
    """A running Flower; ``url`` is its base URL (``http://127.0.0.1:PORT``)."""

    url: str
    port: int
    process: ServiceProcess = field(repr=False, compare=False)

    def get_json(self, path: str, timeout_s: float = 10.0) -> Any:
        """GET ``path`` (e.g. ``/api/tasks``) and decode the JSON body.

        Raises:
            urllib.error.HTTPError: on a non-2xx answer.
        """
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
            return json.loads(response.read().decode())

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Return ``/api/tasks``: task id -> task info (name, state, worker, ...)."""
        result: dict[str, dict[str, Any]] = self.get_json("/api/tasks")
        return result

    def event_workers(self) -> set[str]:
        """Return the hostnames of workers Flower knows from their events (heartbeats)."""
        payload = self.get_json("/workers?json=1")
        return {str(worker["hostname"]) for worker in payload.get("data", [])}

    def wait_for_worker(self, hostname: str, timeout_s: float = 30.0) -> None:
        """Wait until Flower has received events from worker ``hostname``.

        Flower only lists tasks whose events it received, so a test must wait for this before
        sending the tasks it wants Flower to show.

        Raises:
            TimeoutError: when no event from that worker arrives in time.
        """
        self.process.wait_until(
            lambda: hostname in self.event_workers(), timeout_s, f"events from {hostname}"
        )


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def start_flower_process(
    broker_url: str,
    app_module: str = DEFAULT_APP,
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
) -> FlowerServer:
    """Start ``celery -A app_module flower`` on a free loopback port with an open API.

    ``env`` adds settings the app needs besides the broker URL (e.g. its TLS files).

    Raises:
        TimeoutError: when ``GET /api/workers`` does not answer 200 in time (with the log tail).
    """
    port = free_port()
    process = ServiceProcess(
        "flower",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app_module,
            "--broker",
            broker_url,
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        log_path=log_dir / f"flower-{port}.log",
        env=service_env(
            {**(env or {}), "FLOWER_UNAUTHENTICATED_API": "true", "ZW_BROKER_URL": broker_url}
        ),
        cwd=REPO_ROOT,
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until(
            lambda: _answers(url + "/api/workers"), START_TIMEOUT_S, "GET /api/workers"
        )
    except BaseException:
        process.stop()
        raise
    return FlowerServer(url=url, port=port, process=process)


@fixture()
def start_flower(tmp_path: Path) -> Iterator[Callable[..., FlowerServer]]:
    """Factory ``start_flower(broker_url, app_module="zenml_workers.worker") -> FlowerServer``.

    Every Flower it started is stopped at teardown.
    """
    started: list[FlowerServer] = []

    def start(
        broker_url: str, app_module: str = DEFAULT_APP, env: Mapping[str, str] | None = None
    ) -> FlowerServer:
        server = start_flower_process(broker_url, app_module, log_dir=tmp_path, env=env)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.process.stop()
