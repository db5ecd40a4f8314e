"""What a run cost, end to end: embedded runs, a real gpu worker on a cluster, ``zw usage``.

Every comparison is between recorded numbers (a step's record, a cache hit's original's,
the sums the store computes and what the CLI prints), never with a clock.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from stores.metadata.store import MetadataStore
from stores.metadata.usage import USAGE_KEY, seconds
from tests.pipelines import fixtures
from tests.pipelines import usage as pl
from tests.services.process import TEST_SECRET_KEY, ServiceProcess, service_env
from tests.unit.test_usage import check_sums, seed
from zenml_workers import Client, submit
from zenml_workers.cli import cli
from zenml_workers.cli.usage import seconds_text
from zenml_workers.sdk.client import RunView
from zenml_workers.sdk.stack import close_stacks
from zenml_workers.settings import Settings

#: The embedded-default stack fixture, used by name as a test argument.
local_stack = fixtures.local_stack


def _usage_line(output: str, key: str) -> list[str]:
    lines = [line.split() for line in output.splitlines() if line.split()[:1] == [key]]
    assert len(lines) == 1, output
    return lines[0]


def _expected_line(key: str, runs: list[RunView]) -> list[str]:
    costs = [r.cost for r in runs]
    steps = [st for r in runs for st in r.steps.values()]
    return [
        key,
        str(len(runs)),
        str(sum(1 for st in steps if st.attempt > 0)),
        str(sum(1 for st in steps if st.is_cached)),
        *(
            seconds_text(seconds(sum(getattr(c, n) for c in costs)))
            for n in ("cpu_s", "gpu_s", "saved_cpu_s", "saved_gpu_s")
        ),
    ]


# -- the sums on PostgreSQL -----------------------------------------------------------------


@pytest.mark.services
def test_usage_by_sums_costs_and_savings_on_postgresql(postgres_url: str) -> None:
    store = MetadataStore(postgres_url)
    try:
        check_sums(store, seed(store))
    finally:
        store.dispose()


# -- embedded default -----------------------------------------------------------------------


def test_embedded_cached_rerun_saves_exactly_the_originals_recorded_cost(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool's processes start with the first run and inherit this.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    first = pl.costed(n=200_000)
    second = pl.costed(n=200_000)

    prepare, fit = first.steps["prepare"].cost, first.steps["fit"].cost
    assert (prepare.gpus, prepare.gpu_s, prepare.attempts) == ((), 0.0, 1)
    assert prepare.cpu_s > 0 and prepare.wall_s > 0
    assert (fit.gpus, fit.gpu_s) == (("3",), fit.wall_s)  # a trainer: the gpu queue
    assert {st.status for st in second.steps.values()} == {"cached"}
    for inv, st in second.steps.items():
        recorded = first.steps[inv].metadata[USAGE_KEY]
        assert (st.cost.saved_wall_s, st.cost.saved_cpu_s, st.cost.saved_gpu_s) == (
            recorded["wall_s"],
            recorded["cpu_s"],
            recorded["gpu_s"],
        ), inv
        assert (st.cost.total_cpu_s, st.cost.total_gpu_s) == (0.0, 0.0)
    assert (second.cost.cpu_s, second.cost.gpu_s) == (0.0, 0.0)
    assert second.cost.saved_gpu_s == fit.gpu_s
    assert second.cost.saved_cpu_s == seconds(prepare.cpu_s + fit.cpu_s)
    assert first.cost.cpu_s == seconds(prepare.total_cpu_s + fit.total_cpu_s)

    by_run = {row.key: row for row in Client().usage(since="1h", by="run")}
    assert (by_run[first.id].cpu_s, by_run[first.id].gpu_s) == (first.cost.cpu_s, fit.gpu_s)
    assert (by_run[second.id].saved_cpu_s, by_run[second.id].saved_gpu_s) == (
        second.cost.saved_cpu_s,
        second.cost.saved_gpu_s,
    )
    assert (by_run[second.id].cached_steps, by_run[second.id].steps) == (2, 0)

    result = CliRunner().invoke(cli, ["usage", "--by", "user", "--since", "1h"])
    assert result.exit_code == 0, result.output
    assert _usage_line(result.output, first.user) == _expected_line(first.user, [first, second])
    assert all(len(line) <= 100 for line in result.output.splitlines())

    shown = CliRunner().invoke(cli, ["show", second.id])
    assert shown.exit_code == 0, shown.output
    assert (
        f"saved by cache hits: {seconds_text(second.cost.saved_cpu_s)} cpu-s, "
        f"{seconds_text(second.cost.saved_gpu_s)} gpu-s"
    ) in shown.output


def test_embedded_retried_step_costs_every_attempt(local_stack: Settings, tmp_path: Path) -> None:
    run = pl.retried(marker=str(tmp_path / "failed-once"))

    cost = run.steps["fails_once"].cost
    assert (run.status, run.steps["fails_once"].attempt, cost.attempts) == ("completed", 2, 2)
    # The failed first attempt burnt as much as the second before it raised.
    assert cost.total_cpu_s > cost.cpu_s > 0
    assert cost.total_wall_s > cost.wall_s > 0
    assert run.cost.cpu_s == cost.total_cpu_s

    shown = CliRunner().invoke(cli, ["show", run.id])
    assert shown.exit_code == 0, shown.output
    assert f"cost: {seconds_text(run.cost.cpu_s)} cpu-s, 0.000 gpu-s" in shown.output


def test_usage_refuses_a_period_it_cannot_read(local_stack: Settings) -> None:
    result = CliRunner().invoke(cli, ["usage", "--since", "7 days"])
    assert result.exit_code == 2
    assert "e.g. 30m, 12h or 7d" in result.output


# -- a real gpu worker ----------------------------------------------------------------------


@pytest.fixture
def gpu_cluster(
    redis_server, postgres_server, tmp_path: Path
) -> Iterator[tuple[Settings, dict[str, str], str]]:
    """A broker, PostgreSQL, a shared local artifact folder and one ``zw worker --queues gpu``
    that sees two GPUs through ``CUDA_VISIBLE_DEVICES``."""
    node = f"gpu-{uuid.uuid4().hex[:6]}@zwusage"
    env = {
        "ZW_BROKER_URL": redis_server.db_url(11),
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_METADATA_URL": postgres_server.create_database(f"usage_{uuid.uuid4().hex[:8]}"),
        "ZW_ARTIFACT_URI": str(tmp_path / "artifacts"),
        "ZW_QUEUES": "cpu,gpu",
        "ZW_HOME": str(tmp_path / "home"),
    }
    settings = Settings(
        broker_url=env["ZW_BROKER_URL"],
        secret_key=TEST_SECRET_KEY,
        metadata_url=env["ZW_METADATA_URL"],
        artifact_uri=env["ZW_ARTIFACT_URI"],
        queues=["cpu", "gpu"],
        home=tmp_path / "home",
        user="grace",
    )
    argv = [sys.executable, "-m", "zenml_workers.cli", "worker", "--queues", "gpu"]
    worker = ServiceProcess(
        f"zw worker {node}",
        [*argv, "--skip-gpu-check", "--hostname", node],
        log_path=tmp_path / "gpu-worker.log",
        env=service_env(dict(env, CUDA_VISIBLE_DEVICES="0,1"), drop_prefixes=("ZW_", "CUDA_")),
    ).start()
    try:
        worker.wait_for_log(" ready.", 60)
        yield settings, env, node
    finally:
        close_stacks()
        worker.stop()


@pytest.mark.services
def test_cluster_gpu_worker_records_its_two_gpus_and_zw_usage_reports_them(
    gpu_cluster: tuple[Settings, dict[str, str], str],
) -> None:
    settings, env, node = gpu_cluster

    first = submit(pl.train_only, settings=settings, n=300_000).wait(timeout_s=60)
    second = submit(pl.train_only, settings=settings, n=300_000).wait(timeout_s=60)

    step = first.steps["fit_alone"]
    assert (step.worker_host, step.queue, first.user) == (node, "gpu", "grace")
    assert step.metadata[USAGE_KEY]["gpus"] == ["0", "1"]
    assert step.cost.gpus == ("0", "1")
    assert step.cost.gpu_s == 2 * step.cost.wall_s
    assert step.cost.wall_s > 0 and step.cost.cpu_s > 0
    hit = second.steps["fit_alone"]
    assert hit.is_cached
    assert (hit.cost.saved_gpu_s, hit.cost.saved_cpu_s) == (step.cost.gpu_s, step.cost.cpu_s)

    out = subprocess.run(
        [sys.executable, "-m", "zenml_workers.cli", "usage", "--by", "user", "--since", "12h"],
        env=service_env(env, drop_prefixes=("ZW_",)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert _usage_line(out.stdout, "grace") == [
        "grace",
        "2",
        "1",
        "1",
        seconds_text(step.cost.total_cpu_s),
        seconds_text(step.cost.total_gpu_s),
        seconds_text(step.cost.cpu_s),
        seconds_text(step.cost.gpu_s),
    ]
    assert all(len(line) <= 100 for line in out.stdout.splitlines())
