"""A real cluster to break: its own Redis, PostgreSQL and SeaweedFS (restartable), a
``zw scheduler`` process and ``zw worker`` processes, optionally workers "on other VMs" in
network namespaces. Shared by the fault suite (``tests/faults``), the multi-host test
(``tests/integration/test_multi_host.py``) and the fault bench (``python -m bench --only
faults``); nothing here needs pytest.
"""

from __future__ import annotations

import collections
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.services.netns import NetworkHost
from tests.services.postgres import PostgresServer, start_postgres
from tests.services.process import (
    REPO_ROOT,
    TEST_SECRET_KEY,
    ServiceProcess,
    service_env,
    settings_from_env,
    wait_until,
)
from tests.services.redis import RedisServer, start_redis
from tests.services.s3 import S3Server, start_seaweedfs

#: Timing that keeps the suite fast; every other setting stays at its default.
SHORT_TIMING = {
    "ZW_HEARTBEAT_INTERVAL_S": "1",
    "ZW_WORKER_TTL_S": "4",
    "ZW_LEASE_S": "15",
    "ZW_SCHEDULER_INTERVAL_S": "0.5",
    "ZW_INFRA_RETRY_BUDGET_S": "120",
    "ZW_BROKER_CHECK_AFTER_S": "2",
}
READY_TIMEOUT_S = 60.0


@dataclass
class FaultCluster:
    """Services, a scheduler and workers that a test may kill, restart or cut off."""

    root: Path
    redis: RedisServer
    postgres: PostgresServer
    s3: S3Server
    env: dict[str, str]
    #: The first network host; ``net_env`` points a worker in any of them at the services.
    net: NetworkHost | None = None
    net_env: dict[str, str] = field(default_factory=dict)
    #: Every network host, ``net`` first.
    nets: list[NetworkHost] = field(default_factory=list)
    scheduler: ServiceProcess | None = None
    workers: list[ServiceProcess] = field(default_factory=list)
    _metadata: Any = None

    # -- processes -------------------------------------------------------------------------

    def start_scheduler(self) -> ServiceProcess:
        proc = ServiceProcess(
            "zw scheduler",
            [sys.executable, "-m", "zenml_workers.cli", "scheduler"],
            log_path=self.root / f"scheduler-{uuid.uuid4().hex[:6]}.log",
            env=service_env(self.env, drop_prefixes=("ZW_",)),
            cwd=REPO_ROOT,
        ).start()
        proc.wait_for_log("scheduler started", READY_TIMEOUT_S)
        self.scheduler = proc
        return proc

    def start_worker(
        self,
        name: str,
        *,
        queues: str = "cpu",
        concurrency: int = 2,
        pool: str = "prefork",
        in_net: bool = False,
    ) -> ServiceProcess:
        """``zw worker`` as an operator starts it; returns once Celery says it is ready.

        With ``in_net`` it runs inside the network namespace, with its own hostname, pointed
        at the services through the namespace's link.
        """
        argv = [
            sys.executable, "-m", "zenml_workers.cli", "worker",
            "--queues", queues, "--pool", pool, "--hostname", name, "--loglevel", "INFO",
        ]  # fmt: skip
        if pool != "solo":
            argv += ["--concurrency", str(concurrency)]
        env = self.net_env if in_net else self.env
        if in_net:
            assert self.net is not None, "this cluster has no network namespace"
            argv = self.net.argv_in(argv, hostname=name.partition("@")[2] or "vm")
        return self._start_worker_process(
            f"zw worker {name}", name, argv, service_env(env, drop_prefixes=("ZW_",))
        )

    def start_remote_worker(
        self,
        host: NetworkHost,
        label: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        hostname: str | None = None,
    ) -> ServiceProcess:
        """Run worker ``argv`` inside ``host``, as a container on another VM runs it.

        It gets exactly ``env`` (nothing of this process's environment) and ``hostname`` (the
        host's own when None); returns once Celery says it is ready.
        """
        return self._start_worker_process(label, label, host.argv_in(argv, hostname), env)

    def _start_worker_process(
        self, label: str, name: str, argv: Sequence[str], env: Mapping[str, str]
    ) -> ServiceProcess:
        safe = "".join(c if c.isalnum() or c in "-." else "_" for c in name)
        proc = ServiceProcess(
            label,
            argv,
            log_path=self.root / f"worker-{safe}-{uuid.uuid4().hex[:6]}.log",
            env=env,
            cwd=REPO_ROOT,
        ).start()
        try:
            proc.wait_for_log(" ready.", READY_TIMEOUT_S)
        except BaseException:
            proc.stop()
            raise
        self.workers.append(proc)
        return proc

    def stop_processes(self) -> None:
        for proc in [*self.workers, *([self.scheduler] if self.scheduler else [])]:
            proc.stop(timeout_s=5)
        self.workers.clear()
        self.scheduler = None

    @property
    def central_address(self) -> str:
        """The one address of this machine where every service listens for the network hosts.

        It is the first host's ``service_address`` (SeaweedFS binds a single address); the
        other hosts route it through their own link.

        Raises:
            RuntimeError: when the cluster has no network host.
        """
        if self.net is None:
            raise RuntimeError("this cluster has no network namespace")
        return self.net.service_address

    def ensure_services(self) -> None:
        """Bring back any service a test left stopped, and heal a cut link."""
        for net in self.nets:
            if net.partitioned:
                net.heal()
        for svc in (self.redis, self.postgres, self.s3):
            if not svc.is_running():
                svc.start()

    def stop(self) -> None:
        self.stop_processes()
        if self._metadata is not None:
            self._metadata.dispose()
        for svc in (self.s3, self.postgres, self.redis):
            svc.stop()
        for net in self.nets:
            net.destroy()

    # -- the client side -------------------------------------------------------------------

    def settings(self, **overrides: Any) -> Any:
        return settings_from_env(
            self.env, exclude=("ZW_SKIP_GPU_CHECK", "ZW_SCHEDULER_INTERVAL_S"), **overrides
        )

    @property
    def metadata(self) -> Any:
        from stores.metadata.store import MetadataStore

        if self._metadata is None:
            self._metadata = MetadataStore(self.env["ZW_METADATA_URL"])
        return self._metadata


def start_fault_cluster(
    root: Path,
    *,
    timing: Mapping[str, str] = SHORT_TIMING,
    with_net: bool = False,
    hostnames: Sequence[str] = (),
) -> FaultCluster:
    """Start Redis, PostgreSQL and SeaweedFS for one cluster (no workers yet).

    With ``hostnames`` a network namespace is made first for each ("VMs" with those
    hostnames), and every service also listens on :attr:`FaultCluster.central_address`,
    which each namespace reaches through its own link only; ``with_net`` is one host,
    ``vm1``. :meth:`FaultCluster.start_worker` puts a worker into the first,
    :meth:`FaultCluster.start_remote_worker` into any.

    Raises:
        ServiceUnavailableError: a service (or, with hosts, network namespaces) is not
            available here.
        ValueError: a hostname is not a valid host name.
    """
    root.mkdir(parents=True, exist_ok=True)
    if with_net and not hostnames:
        hostnames = ("vm1",)
    started: list[Any] = []
    nets: list[NetworkHost] = []
    try:
        for hostname in hostnames:
            nets.append(NetworkHost.create(hostname=hostname))
            started.append(nets[-1])
        net = nets[0] if nets else None
        for other in nets[1:]:
            other.add_route(nets[0].service_address)
        # PostgreSQL trusts the subnets of its listen addresses, so it listens on every link.
        extra = [n.service_address for n in nets]
        redis = start_redis(root / "redis", bind_hosts=extra)
        started.append(redis)
        postgres = start_postgres(bind_hosts=extra)
        started.append(postgres)
        s3 = start_seaweedfs(root / "s3", bind_hosts=extra[:1])
        started.append(s3)
        db = f"faults_{uuid.uuid4().hex[:8]}"
        url = postgres.create_database(db)
        bucket = s3.make_bucket()
        env = {
            "ZW_BROKER_URL": redis.db_url(0),
            "ZW_SECRET_KEY": TEST_SECRET_KEY,
            "ZW_METADATA_URL": url,
            "ZW_ARTIFACT_URI": f"s3://{bucket}/artifacts",
            "ZW_S3_ENDPOINT_URL": s3.endpoint_url,
            "ZW_S3_ACCESS_KEY_ID": s3.access_key_id,
            "ZW_S3_SECRET_ACCESS_KEY": s3.secret_access_key,
            "ZW_S3_REGION": s3.region,
            "ZW_QUEUES": "cpu,gpu,edge",
            "ZW_SKIP_GPU_CHECK": "1",
            "ZW_HOME": str(root / "home"),
            **timing,
        }
        net_env = {}
        if net is not None:
            net_env = {
                **env,
                "ZW_BROKER_URL": redis.url_for(net.service_address, 0),
                "ZW_METADATA_URL": postgres.url_for(net.service_address, db),
                "ZW_HOME": str(root / "home-vm1"),
            }
    except BaseException:
        for svc in reversed(started):
            svc.destroy() if isinstance(svc, NetworkHost) else svc.stop()
        raise
    return FaultCluster(
        root=root,
        redis=redis,
        postgres=postgres,
        s3=s3,
        env=env,
        net=net,
        net_env=net_env,
        nets=nets,
    )


# -- what the tests and the bench check ------------------------------------------------------


def wait_for_pid(marker_dir: Path, tag: str, timeout_s: float = 60.0, *, count: int = 1) -> int:
    """The pid of the ``count``-th process that started ``hold`` with ``tag``."""

    def found() -> list[Path]:
        return sorted(marker_dir.glob(f"pid-{tag}-*"), key=lambda p: p.stat().st_mtime)

    wait_until(lambda: len(found()) >= count, timeout_s, f"hold[{tag}] attempt {count} to start")
    return int(found()[count - 1].read_text())


def body_runs(marker_dir: Path) -> collections.Counter[str]:
    """How many times each step body started, from ``bodies.log``."""
    path = marker_dir / "bodies.log"
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines() if line)


def commit_problems(metadata: Any, run_id: str) -> list[str]:
    """Everything that breaks "each output committed once, by the final attempt": more or
    fewer than one artifact row and one output lineage row per declared output, or one that
    belongs to another attempt. Empty when the run is clean."""
    from sqlalchemy import select

    from scheduler.dispatch import SPECS
    from stores.metadata.models import ArtifactRow, LineageRow, StepRunRow

    problems = []
    with metadata.read() as s:
        _, by_id, _ = SPECS.get(s, run_id)
        steps = s.execute(select(StepRunRow).where(StepRunRow.run_id == run_id)).scalars()
        for st in steps:
            spec = by_id[st.invocation_id]
            outputs = set(spec.output_names())
            arts = list(
                s.execute(
                    select(ArtifactRow).where(ArtifactRow.producer_step_run_id == st.id)
                ).scalars()
            )
            edges = list(
                s.execute(
                    select(LineageRow).where(
                        LineageRow.step_run_id == st.id, LineageRow.direction == "output"
                    )
                ).scalars()
            )
            if st.status != "completed":
                problems.append(f"{st.invocation_id} is {st.status}")
            if sorted(a.name for a in arts) != sorted(outputs):
                problems.append(f"{st.invocation_id}: artifact rows {[a.name for a in arts]}")
            if sorted(e.name for e in edges) != sorted(outputs):
                problems.append(f"{st.invocation_id}: output edges {[e.name for e in edges]}")
            for a in arts:
                if f"/{st.invocation_id}.{st.attempt}." not in a.uri:
                    problems.append(f"{st.invocation_id}: {a.uri} is not attempt {st.attempt}'s")
    return problems


def object_keys(s3: S3Server, env: Mapping[str, str], run_id: str) -> list[str]:
    """Object keys under the run's prefix in the cluster's bucket."""
    bucket, _, prefix = env["ZW_ARTIFACT_URI"].removeprefix("s3://").partition("/")
    client = s3.client()
    out = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{run_id}/")
    return sorted(o["Key"] for o in out.get("Contents", []))


def since(t0: float) -> float:
    return round(time.time() - t0, 2)
