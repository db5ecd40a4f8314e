"""One breakable cluster for the fault suite; each test starts its own scheduler and workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import FaultCluster, start_fault_cluster
from tests.services.process import ServiceUnavailableError, service_unavailable


@pytest.fixture(scope="session")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    try:
        cluster = start_fault_cluster(tmp_path_factory.mktemp("faults"), with_net=True)
    except ServiceUnavailableError as e:
        service_unavailable(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture()
def cluster(fault_cluster: FaultCluster) -> Iterator[FaultCluster]:
    """The cluster with every service up, an empty broker, and no scheduler or worker yet."""
    from zenml_workers.sdk.stack import close_stacks

    fault_cluster.ensure_services()
    fault_cluster.redis.flushall()
    try:
        yield fault_cluster
    finally:
        fault_cluster.stop_processes()
        close_stacks()
        fault_cluster.ensure_services()
