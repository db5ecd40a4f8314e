"""Workers on two "VMs" join one central host, configured by ``docker-compose.workers.yml``.

Two network namespaces stand in for worker VMs: each has its own hostname (a UTS namespace),
home and temporary folder, and reaches this machine through its own veth link only, so the
two share no folder and artifacts travel through S3 alone. Each runs the compose file's
worker services as their containers would: the images' entrypoint (``zw worker``) with the
service's command, hostname and environment exactly as docker-compose renders them, with the
central host mapped to this machine's address on the links. The central host is Redis (with
a password, as docker-compose.yml runs it), PostgreSQL and SeaweedFS, started by the test.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.faults.harness import FaultCluster, object_keys, start_fault_cluster
from tests.pipelines import multi_host as pl
from tests.services.compose import render, required_variables, service_environment, variables
from tests.services.netns import network_unavailable_reason
from tests.services.process import (
    REPO_ROOT,
    TEST_SECRET_KEY,
    ServiceUnavailableError,
    require_binary,
    service_unavailable,
)
from zenml_workers import submit

# Three worker starts and the central services on a busy 2-core machine need more than 120 s.
pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(300)]

WORKERS_COMPOSE = REPO_ROOT / "docker-compose.workers.yml"
#: The image each service runs, by the Dockerfile that builds it (for its entrypoint).
DOCKERFILES = {
    "worker-cpu": REPO_ROOT / "docker" / "worker.Dockerfile",
    "worker-gpu": REPO_ROOT / "docker" / "worker-gpu.Dockerfile",
}
#: Which services each "VM" runs: a CPU VM, and a VM with a CPU and a GPU worker.
VMS = {"vmA": ("worker-cpu",), "vmB": ("worker-cpu", "worker-gpu")}
WIDTH = 4
RUN_TIMEOUT_S = 120.0


@pytest.fixture()
def central(tmp_path: Path) -> Iterator[FaultCluster]:
    """The central host's services, reachable from one network namespace per VM."""
    reason = network_unavailable_reason()
    if reason is not None:
        service_unavailable(reason)
    try:
        cluster = start_fault_cluster(tmp_path / "central", timing={}, hostnames=tuple(VMS))
    except ServiceUnavailableError as e:
        service_unavailable(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


def _compose_values(cluster: FaultCluster, redis_password: str, pg_password: str) -> dict[str, str]:
    """What a worker VM's ``.env`` holds, pointing at the central host's services."""
    return {
        "ZW_CENTRAL_HOST": cluster.central_address,
        "ZW_REDIS_PORT": str(cluster.redis.port),
        "ZW_POSTGRES_PORT": str(cluster.postgres.port),
        "ZW_S3_PORT": str(urlsplit(cluster.s3.endpoint_url).port),
        "ZW_REDIS_PASSWORD": redis_password,
        "ZW_POSTGRES_PASSWORD": pg_password,
        "ZW_S3_ACCESS_KEY_ID": cluster.s3.access_key_id,
        "ZW_S3_SECRET_ACCESS_KEY": cluster.s3.secret_access_key,
        "ZW_SECRET_KEY": TEST_SECRET_KEY,
        "ZW_CPU_CONCURRENCY": "1",
        "ZW_WORKER_HOSTNAME": "set-per-vm",
    }


def _serve_what_compose_expects(
    cluster: FaultCluster, env: Mapping[str, str], redis_password: str
) -> None:
    """Give the central services the user, database, bucket and password the file names."""
    import psycopg
    import redis
    from psycopg import sql
    from sqlalchemy.engine import make_url

    with redis.Redis(cluster.redis.host, cluster.redis.port, socket_timeout=5) as client:
        client.config_set("requirepass", redis_password)
    url = make_url(env["ZW_METADATA_URL"])
    conninfo = (
        f"host=127.0.0.1 port={cluster.postgres.port} user={cluster.postgres.user} dbname=postgres"
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(str(url.username)), sql.Literal(url.password)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(str(url.database)), sql.Identifier(str(url.username))
            )
        )
    bucket = env["ZW_ARTIFACT_URI"].removeprefix("s3://").partition("/")[0]
    cluster.s3.make_bucket(bucket)


def _entrypoint(dockerfile: Path) -> list[str]:
    lines = [line for line in dockerfile.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert lines, f"{dockerfile.name} has no ENTRYPOINT"
    entrypoint: list[str] = json.loads(lines[-1].split(None, 1)[1])
    return entrypoint


def _container_env(service: Mapping[str, Any], vm_dir: Path) -> dict[str, str]:
    """A container's environment: the service's, plus what the image and Docker set."""
    home, tmp = vm_dir / "home", vm_dir / "tmp"
    home.mkdir(parents=True)
    tmp.mkdir()
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),  # and so ZW_HOME, unset: $HOME/.zenml-workers
        "TMPDIR": str(tmp),
        "HOSTNAME": str(service["hostname"]),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        # The images put the team's code on PYTHONPATH; here the team's code is this repository.
        "PYTHONPATH": str(REPO_ROOT),
        **service_environment(service),
    }


def test_workers_on_two_vms_share_one_run_through_the_central_host(
    central: FaultCluster, tmp_path: Path
) -> None:
    from zenml_workers.sdk.stack import close_stacks
    from zenml_workers.settings import load_settings

    values = _compose_values(central, secrets.token_hex(12), secrets.token_hex(12))
    # Every value the test gives is one the file reads, and none it requires is missing.
    assert set(values) <= variables(WORKERS_COMPOSE), set(values) - variables(WORKERS_COMPOSE)
    assert required_variables(WORKERS_COMPOSE) <= set(values)
    configs = {
        vm: render(WORKERS_COMPOSE, values | {"ZW_WORKER_HOSTNAME": vm})["services"] for vm in VMS
    }
    env = service_environment(configs["vmA"]["worker-cpu"])
    assert urlsplit(env["ZW_S3_ENDPOINT_URL"]).hostname == central.central_address
    _serve_what_compose_expects(central, env, values["ZW_REDIS_PASSWORD"])

    zw = Path(sys.executable).parent / "zw"
    zw_path = str(zw) if zw.exists() else require_binary("zw")
    hosts = dict(zip(VMS, central.nets, strict=True))
    for vm, services in VMS.items():
        for name in services:
            service = configs[vm][name]
            entrypoint = _entrypoint(DOCKERFILES[name])
            assert entrypoint[0] == "zw", entrypoint
            container_env = _container_env(service, tmp_path / vm / name)
            if name == "worker-gpu":
                container_env["ZW_SKIP_GPU_CHECK"] = "1"  # no GPU here; the VM would have one
            central.start_remote_worker(
                hosts[vm],
                f"{name}@{vm}",
                [zw_path, *entrypoint[1:], *service["command"]],
                container_env,
                hostname=str(service["hostname"]),
            )

    client_env = {k[3:].lower(): v for k, v in env.items() if k.startswith("ZW_") and v}
    settings = load_settings(**client_env, home=tmp_path / "client-home")
    try:
        tag = uuid.uuid4().hex[:12]
        handle = submit(pl.spread, settings=settings, tag=tag, width=WIDTH, hosts=len(VMS))
        run = handle.wait(timeout_s=RUN_TIMEOUT_S, progress=False)
        peers = {vm: hosts[vm].tcp_peers() for vm in VMS}

        assert run.status == "completed", [
            (s.invocation_id, s.exception) for s in run.steps.values()
        ]
        shards = [st for st in run.steps.values() if st.name == "shard"]
        assert len(shards) == WIDTH
        assert {st.worker_host for st in shards} == {"cpu@vmA", "cpu@vmB"}
        for st in shards:
            part = st.output.load()
            assert part["host"] == str(st.worker_host).partition("@")[2]
            assert part["barrier"] == sorted(VMS)
        summary = run.steps["gather"].output.load()
        assert summary == {"total": sum(i * i for i in range(WIDTH)), "hosts": sorted(VMS)}
        assert run.steps["fit"].worker_host == "gpu@vmB"
        assert run.steps["fit"].output.load() == {**summary, "fitted_on": "vmB"}
        assert object_keys(central.s3, env, run.id), "no artifact of the run is in S3"
    finally:
        close_stacks()

    # Each VM talked to the central address only, over its own link, and wrote no artifact of
    # its own: nothing leaves the links the test made.
    for vm, host in hosts.items():
        assert peers[vm] == {central.central_address}, (vm, peers[vm])
        assert not any(route.startswith("default") for route in host.routes()), host.routes()
        local = [p for p in (tmp_path / vm).rglob("*") if "artifacts" in p.parts]
        assert not local, f"{vm} wrote artifacts to its own disk: {local}"
    central.stop()
    assert not any(host.exists() for host in hosts.values())
