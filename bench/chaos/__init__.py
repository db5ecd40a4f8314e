"""Chaos bench: a bounded storm of runs on one cluster while workers, pool processes,
Redis, PostgreSQL and a network link fail at random.

One :class:`~tests.faults.harness.FaultCluster` with the shipped default timing runs two
prefork workers (one "on another VM", in the network namespace), one solo worker and the
scheduler. Two client processes (``python -m bench.chaos CLIENT_ARGS``) submit ``diamond``
and ``fan`` runs of :mod:`tests.pipelines.faults` until the deadline, then wait for them and
print one JSON line per run. Meanwhile this process strikes a fault every 10-20 s: SIGKILL a
worker's whole tree (then start a replacement) or one prefork pool child, and once each
restart Redis, restart PostgreSQL and cut the namespace worker off for 30 s.

- :mod:`bench.chaos.report`: the fault plan, the records, the summary and the results, pure
  functions of the records, unit-tested in ``tests/unit/test_chaos_report.py``.
- :mod:`bench.chaos.killer`: the fault-injection loop.
- :mod:`bench.chaos.client`: the client processes (``python -m bench.chaos``, see
  :mod:`bench.chaos.__main__`) and how the bench starts them.
- :mod:`bench.chaos.run`: :func:`run_chaos`, which ties them together and checks the runs.
"""

from __future__ import annotations

from bench.chaos.report import (
    PARTITION,
    POOL_KILL,
    POSTGRES_RESTART,
    REDIS_RESTART,
    TARGET,
    WORKER_KILL,
    ChaosSummary,
    Fault,
    RunRecord,
    chaos_results,
    duplicate_outputs,
    parse_client_output,
    plan_faults,
    summarise,
)
from bench.chaos.run import run_chaos

__all__ = [
    "PARTITION",
    "POOL_KILL",
    "POSTGRES_RESTART",
    "REDIS_RESTART",
    "TARGET",
    "WORKER_KILL",
    "ChaosSummary",
    "Fault",
    "RunRecord",
    "chaos_results",
    "duplicate_outputs",
    "parse_client_output",
    "plan_faults",
    "run_chaos",
    "summarise",
]
