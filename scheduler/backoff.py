"""Exponential backoff with full jitter, for infrastructure errors and step retries.

Infrastructure errors (the metadata store, S3 or the broker unreachable) get their own
budget, separate from a step's ``retries``: a database restart must not use up the
attempts a flaky step was given, and must never mark a step failed. Delays grow
exponentially up to a cap, each drawn uniformly below its bound ("full jitter"), so a
fleet of workers that lost the same database does not reconnect in lockstep.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from stores.errors import InfrastructureError

log = logging.getLogger("zenml_workers.worker")

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays of ``base_s * 2**n``, capped at ``cap_s``, jittered; retried for ``budget_s`` at most."""

    base_s: float = 0.25
    cap_s: float = 15.0
    budget_s: float = 600.0

    def bound(self, retry: int) -> float:
        """Upper bound of the delay before retry number ``retry`` (0-based)."""
        return min(self.cap_s, self.base_s * (2 ** min(retry, 32)))

    def delays(self, rng: Callable[[], float] = random.random) -> Iterator[float]:
        """Jittered delays, for ever; the caller stops at its budget."""
        retry = 0
        while True:
            yield self.bound(retry) * rng()
            retry += 1


def retry_delay_s(attempt: int, base_s: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry ``attempt`` (1 after the first failure) of a step that raised:
    ``base_s`` doubling per attempt up to 60 s, jittered between half and all of it, so
    a step that fails on a busy dependency does not hammer it. 0 when ``base_s`` is 0."""
    bound = min(60.0, base_s * 2 ** max(0, attempt - 1))
    return bound * (0.5 + 0.5 * rng())


def call_with_backoff(
    fn: Callable[[], T],
    *,
    what: str,
    policy: Backoff,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
) -> T:
    """Call ``fn`` until it does not raise an :class:`InfrastructureError`, sleeping a jittered,
    growing delay between tries, for at most ``policy.budget_s``.

    Raises:
        InfrastructureError: the last one, once the budget is spent.
    """
    deadline = clock() + policy.budget_s
    delays = policy.delays(rng)
    tries = 0
    while True:
        try:
            return fn()
        except InfrastructureError as e:
            tries += 1
            delay = next(delays)
            if clock() + delay > deadline:
                log.error("%s: giving up after %d tries: %s", what, tries, e)
                raise
            log.warning("%s: %s; retry %d in %.2fs", what, e, tries, delay)
            sleep(delay)
