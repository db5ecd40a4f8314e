"""The autoscaling recipes (``deploy/``) are valid and do what the README says, without a
cluster: the KEDA and Kubernetes manifests pass their API schemas (the kubernetes-models
validators, installed by ``scripts/setup.sh`` into ``tests/k8s``), scale on metrics the
scheduler really exports and a SQL query that really counts the demand; the systemd units
pass ``systemd-analyze verify``; the shell scripts pass shellcheck; a preemption notice
drains a real ``zw worker``.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from scheduler.metrics import SchedulerCollector, queue_loads
from scheduler.specs import OutputSpec, PipelineSpec, StepSpec
from stores.metadata import attempts
from stores.metadata.store import MetadataStore
from tests.pipelines.planning import plan
from tests.services.process import (
    REPO_ROOT,
    TEST_SECRET_KEY,
    ServiceProcess,
    require_binary,
    service_env,
    service_unavailable,
)

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
VM_DIR = REPO_ROOT / "deploy" / "vm"
VALIDATOR = REPO_ROOT / "tests" / "k8s" / "validate.mjs"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))
UNITS = sorted(VM_DIR.glob("*.service"))
SCRIPTS = sorted(VM_DIR.glob("*.sh"))
NOW = 1_000_000.0


def _validate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    node = require_binary("node")
    if not (REPO_ROOT / "tests" / "k8s" / "node_modules" / "@kubernetes-models" / "keda").is_dir():
        service_unavailable(
            "the k8s schema validators are not installed in tests/k8s; run scripts/setup.sh"
        )
    return subprocess.run(
        [node, str(VALIDATOR), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    out = _validate("--dump", *MANIFESTS)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def _of_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def _concurrency(deployment: dict[str, Any]) -> int:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return int(args[args.index("--concurrency") + 1])


def test_k8s_manifests_pass_the_kubernetes_and_keda_schemas() -> None:
    assert MANIFESTS, "no manifests under deploy/k8s"
    out = _validate(*MANIFESTS)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (("maxReplicaCount: 20", 'maxReplicaCount: "20"'), "maxReplicaCount must be integer"),
        (('threshold: "4"', "threshold: 4"), "threshold must be string"),
        (("  triggers:", "  notTriggers:"), "must have required property triggers"),
    ],
)
def test_k8s_validator_refuses_a_broken_scaled_object(
    tmp_path: Path, edit: tuple[str, str], complaint: str
) -> None:
    good = (K8S_DIR / "keda-cpu-prometheus.yaml").read_text()
    assert edit[0] in good
    broken = tmp_path / "broken.yaml"
    broken.write_text(good.replace(edit[0], edit[1]))
    out = _validate(broken)
    assert out.returncode == 1
    assert complaint in out.stderr


def test_keda_scaled_objects_target_workers_with_their_concurrency(
    documents: list[dict[str, Any]],
) -> None:
    deployments = _of_kind(documents, "Deployment")
    scaled = _of_kind(documents, "ScaledObject")
    assert set(scaled) == {"zw-worker-cpu", "zw-worker-gpu"}
    for obj in scaled.values():
        spec = obj["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        assert target["spec"]["replicas"] == 0 and spec["minReplicaCount"] == 0
        (trigger,) = spec["triggers"]
        threshold = trigger["metadata"].get("threshold") or trigger["metadata"]["targetQueryValue"]
        # replicas = ceil(demand / threshold): the threshold is a worker's concurrency.
        assert int(threshold) == _concurrency(target)
        assert trigger["metricType"] == "AverageValue"
    auth = _of_kind(documents, "TriggerAuthentication")
    gpu_trigger = scaled["zw-worker-gpu"]["spec"]["triggers"][0]
    assert gpu_trigger["authenticationRef"]["name"] in auth


def test_keda_prometheus_query_names_metrics_the_scheduler_exports(
    documents: list[dict[str, Any]], tmp_path: Path
) -> None:
    store = MetadataStore(f"sqlite:///{tmp_path / 'm.db'}")
    collector = SchedulerCollector(
        store,
        queues=["cpu", "gpu"],
        worker_ttl_s=10,
        broker_lengths=None,
        recovery=Counter(),
        clock=lambda: NOW,
    )
    exported = {s.name for family in collector.collect() for s in family.samples}
    store.dispose()
    trigger = _of_kind(documents, "ScaledObject")["zw-worker-cpu"]["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    used = set(re.findall(r"\b(zw_[a-z_]+)\{", trigger["metadata"]["query"]))
    assert used == {"zw_queue_ready_steps", "zw_queue_running_steps"}
    assert used <= exported
    assert '{queue="cpu"}' in trigger["metadata"]["query"]
    scheduler = _of_kind(documents, "Deployment")["zw-scheduler"]
    args = scheduler["spec"]["template"]["spec"]["containers"][0]["args"]
    port = args[args.index("--metrics-port") + 1]
    service = _of_kind(documents, "Service")["zw-scheduler-metrics"]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == port


def test_keda_postgresql_query_counts_the_queue_demand(
    documents: list[dict[str, Any]], postgres_url: str
) -> None:
    """The SQL of the gpu ScaledObject, run on a real store: 6 gpu steps under a window of 2,
    one of them running, count as ``zw queues`` counts them (ready + running)."""
    trigger = _of_kind(documents, "ScaledObject")["zw-worker-gpu"]["spec"]["triggers"][0]
    assert trigger["type"] == "postgresql"
    steps = tuple(
        StepSpec(
            invocation_id=f"t{i}",
            name="t",
            code_hash=f"sha256:c{i}",
            source_hash="sha256:s",
            outputs=(OutputSpec("output", "builtins:int"),),
            queue="gpu",
            enable_cache=False,
        )
        for i in range(6)
    )
    store = MetadataStore(postgres_url)
    try:
        queued = plan(
            store, PipelineSpec(name="g", steps=steps, enable_cache=False), window=2, now=NOW
        )
        with store.autocommit() as s:
            assert attempts.claim(
                s, queued[0].task.step_run_id, host="g@h", pid=1, lease_s=60, now=NOW
            )
        with store.read() as s:
            counted = s.execute(text(trigger["metadata"]["query"])).scalar_one()
            (gpu,) = [x for x in queue_loads(s, now=NOW, worker_ttl_s=10) if x.queue == "gpu"]
    finally:
        store.dispose()
    assert counted == gpu.ready + gpu.running == 6


def _verify_root(tmp_path: Path, units: list[Path]) -> Path:
    """A root for ``systemd-analyze verify --root``: this machine's system units, the units
    under test, and a stand-in executable at each ExecStart path."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    for system_dir in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(system_dir, "sysinit.target").exists():
            shutil.copytree(system_dir, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
            break
    else:
        service_unavailable("no systemd unit tree here (sysinit.target); install systemd")
    for unit in units:
        shutil.copy(unit, root / "etc" / "systemd" / "system" / unit.name)
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                exe = root / line.split("=", 1)[1].split()[0].lstrip("/")
                exe.parent.mkdir(parents=True, exist_ok=True)
                exe.write_text("#!/bin/sh\n")
                exe.chmod(0o755)
    return root


def _verify(root: Path, *names: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("systemd-analyze")
    return subprocess.run(
        [binary, "verify", f"--root={root}", *names],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _instances(units: list[Path]) -> list[str]:
    return [u.name.replace("@.service", "@cpu.service") for u in units]


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert {u.name for u in UNITS} == {"zw-worker@.service", "zw-preemption-watch.service"}
    out = _verify(_verify_root(tmp_path, UNITS), *_instances(UNITS))
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "zw-worker@.service"
    broken.write_text(
        (VM_DIR / "zw-worker@.service").read_text().replace("KillMode=mixed", "KillMode=gentle")
    )
    out = _verify(_verify_root(tmp_path, [broken]), "zw-worker@cpu.service")
    assert "Failed to parse kill mode" in out.stderr


def test_worker_unit_drains_the_main_process_only() -> None:
    unit = (VM_DIR / "zw-worker@.service").read_text()
    # SIGTERM to the main process alone is Celery's warm shutdown; to every process of the
    # group it would also hit the pool children running steps.
    assert "KillSignal=SIGTERM" in unit and "KillMode=mixed" in unit
    assert "--queues %i" in unit and "--concurrency ${ZW_WORKER_CONCURRENCY}" in unit


def test_deploy_scripts_pass_shellcheck() -> None:
    binary = require_binary("shellcheck")
    out = subprocess.run([binary, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


class _FakeMetadata(http.server.BaseHTTPRequestHandler):
    """GCE's ``instance/preempted`` on loopback: FALSE until the test says otherwise."""

    preempted = threading.Event()
    asked = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).asked.set()
        body = b"TRUE" if type(self).preempted.is_set() else b"FALSE"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture()
def fake_metadata() -> Iterator[str]:
    _FakeMetadata.preempted.clear()
    _FakeMetadata.asked.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeMetadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/instance/preempted"
    finally:
        server.shutdown()
        server.server_close()


def test_preemption_notice_drains_a_real_worker(
    redis_server, fake_metadata: str, tmp_path: Path
) -> None:
    require_binary("curl")
    broker = redis_server.db_url(14)
    redis.Redis.from_url(broker).flushdb()
    env = {
        "ZW_BROKER_URL": broker,
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_HOME": str(tmp_path / "home"),
        "ZW_HEARTBEAT_INTERVAL_S": "1",
    }
    worker = ServiceProcess(
        "zw worker",
        [
            sys.executable,
            "-m",
            "zenml_workers.cli",
            "worker",
            "-Q",
            "cpu",
            "-c",
            "1",
            "-n",
            "cpu@vm",
        ],
        log_path=tmp_path / "worker.log",
        env=service_env(env, drop_prefixes=("ZW_",)),
        cwd=REPO_ROOT,
    ).start()
    watch = None
    try:
        worker.wait_for_log(" ready.", 60)
        watch = subprocess.Popen(
            ["bash", str(VM_DIR / "zw-preemption-watch.sh")],
            env={
                **service_env(),
                "ZW_CLOUD": "gce",
                "ZW_PREEMPTION_URL": fake_metadata,
                "ZW_POLL_INTERVAL_S": "0.1",
                "ZW_DRAIN_COMMAND": f"kill -TERM {worker.pid}",
            },
            stderr=subprocess.PIPE,
            text=True,
        )
        assert _FakeMetadata.asked.wait(30), "the watcher never asked the metadata server"
        assert watch.poll() is None  # no notice yet: it keeps watching, the worker serves
        assert worker.is_running()
        _FakeMetadata.preempted.set()
        assert watch.wait(timeout=30) == 0
        worker.wait_until(lambda: not worker.is_running(), 60, "the worker to shut down")
        assert worker.returncode == 0
        assert "Warm shutdown" in worker.log_text()
        assert "preemption notice: draining the workers" in (
            watch.stderr.read() if watch.stderr else ""
        )
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
            watch.wait()
        worker.stop()


def test_scale_script_resizes_to_what_zw_queues_wants(tmp_path: Path) -> None:
    """``zw-scale-mig.sh`` reads ``zw queues --json`` and hands ``wanted`` to the resize
    command: 6 ready cpu steps, 4 per worker, at most 3 workers: 2."""
    home = tmp_path / "home"
    store = MetadataStore(f"sqlite:///{home / 'metadata.db'}")
    steps = tuple(
        StepSpec(
            invocation_id=f"c{i}",
            name="c",
            code_hash=f"sha256:c{i}",
            source_hash="sha256:s",
            outputs=(OutputSpec("output", "builtins:int"),),
            enable_cache=False,
        )
        for i in range(6)
    )
    plan(
        store,
        PipelineSpec(name="c", steps=steps, enable_cache=False),
        window=2,
        orchestrator="local",
        now=NOW,
    )
    store.dispose()
    zw = Path(sys.executable).parent / "zw"
    out = subprocess.run(
        ["bash", str(VM_DIR / "zw-scale-mig.sh"), "cpu", "3", "4"],
        env={
            **service_env({"ZW_HOME": str(home)}, drop_prefixes=("ZW_",)),
            "ZW_BIN": str(zw),
            "ZW_RESIZE_COMMAND": "echo resize --size {size}",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "resize --size 2"
    assert "queue cpu wants 2 worker(s)" in out.stderr
