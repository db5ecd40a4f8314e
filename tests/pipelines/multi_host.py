"""The pipeline the multi-host test submits; the workers import this module by name.

``shard`` is a barrier: each one records its host on the broker's Redis (the one service
every worker reaches) and waits until ``hosts`` hosts have started a shard, so the fan-out
runs on every worker host whatever order the broker hands out messages in. It never waits
longer than ``BARRIER_LIMIT_S``: a host that never joins fails the step with its reason.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Annotated

from zenml_workers import pipeline, step, trainer

BARRIER_LIMIT_S = 60.0


def _join_barrier(tag: str, hosts: int) -> list[str]:
    """Add this host to barrier ``tag``; return the hosts in it once there are ``hosts``.

    Raises:
        TimeoutError: when fewer hosts joined within ``BARRIER_LIMIT_S`` seconds.
    """
    import redis

    key = f"zw-test:barrier:{tag}"
    # The worker's own broker URL: a step gets the worker's environment, nothing else.
    with redis.Redis.from_url(os.environ["ZW_BROKER_URL"], socket_timeout=5) as client:
        client.sadd(key, socket.gethostname())
        client.expire(key, 600)
        deadline = time.monotonic() + BARRIER_LIMIT_S
        while True:
            seen = sorted(m.decode() for m in client.smembers(key))
            if len(seen) >= hosts:
                return seen
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {', '.join(seen)} started a shard of {tag}")
            time.sleep(0.05)


@step(enable_cache=False)
def shard(tag: str, i: int, hosts: int) -> Annotated[dict, "part"]:
    """The square of ``i``, with the host it ran on, once ``hosts`` hosts run shards."""
    seen = _join_barrier(tag, hosts)
    return {"i": i, "square": i * i, "host": socket.gethostname(), "barrier": seen}


@step(enable_cache=False)
def gather(parts: list[dict]) -> Annotated[dict, "summary"]:
    return {"total": sum(p["square"] for p in parts), "hosts": sorted({p["host"] for p in parts})}


@trainer(enable_cache=False)
def fit(summary: dict) -> Annotated[dict, "model"]:
    """On the gpu queue: the summary, with the host the gpu worker ran on."""
    return {**summary, "fitted_on": socket.gethostname()}


@pipeline(enable_cache=False)
def spread(tag: str = "", width: int = 4, hosts: int = 2):
    """``width`` barrier shards -> gather (cpu) -> fit (gpu)."""
    fit(gather([shard(tag, i, hosts) for i in range(width)]))
