"""The lease policy, as pure functions of recorded state and ``now`` (no sleeping)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scheduler.backoff import Backoff, call_with_backoff
from scheduler.lease import LeasePolicy, Redelivery
from stores.errors import ArtifactStoreUnavailableError, MetadataStoreError

POLICY = LeasePolicy(lease_s=120, heartbeat_interval_s=2, worker_ttl_s=10, timeout_margin_s=30)


def _holder(**kw: object) -> SimpleNamespace:
    base: dict[str, object] = {
        "status": "running",
        "attempt": 1,
        "max_attempts": 1,
        "worker_host": "cpu@a",
        "worker_pid": 100,
        "run_status": "running",
    }
    base.update(kw)
    return SimpleNamespace(**base)


def _decide(
    holder: object, *, pid: int = 200, alive: bool = False, here: bool = False
) -> Redelivery:
    return POLICY.on_redelivery(
        holder, host="cpu@a", pid=pid, running_here=here, pid_alive=lambda _pid: alive
    )


def test_lease_for_a_step_with_a_timeout_adds_the_margin() -> None:
    assert POLICY.lease_for(None) == 120
    assert POLICY.lease_for(5) == 35
    assert (
        LeasePolicy(heartbeat_interval_s=40, worker_ttl_s=120, timeout_margin_s=30).lease_for(5)
        == 45
    )


def test_lease_workers_silent_past_their_ttl_are_gone() -> None:
    assert POLICY.silent_before(1000) == 990


def test_lease_heartbeats_are_judged_only_after_one_ttl_of_watching() -> None:
    assert not POLICY.may_judge_heartbeats(None, 1000)
    assert not POLICY.may_judge_heartbeats(995, 1000)
    assert POLICY.may_judge_heartbeats(990, 1000)


def test_lease_redelivery_takes_over_from_a_dead_process_on_this_node() -> None:
    assert _decide(_holder(), alive=False) is Redelivery.TAKE_OVER


def test_lease_redelivery_drops_a_duplicate_while_the_holder_lives() -> None:
    assert _decide(_holder(), alive=True) is Redelivery.DROP


def test_lease_redelivery_never_judges_another_nodes_process() -> None:
    assert _decide(_holder(worker_host="cpu@b"), alive=False) is Redelivery.DROP


def test_lease_redelivery_of_our_own_claim_that_nothing_runs_takes_over() -> None:
    assert _decide(_holder(worker_pid=200), pid=200, here=False) is Redelivery.TAKE_OVER
    assert _decide(_holder(worker_pid=200), pid=200, here=True) is Redelivery.DROP


@pytest.mark.parametrize(
    "holder",
    [None, _holder(status="queued"), _holder(status="completed"), _holder(run_status="cancelled")],
)
def test_lease_redelivery_drops_steps_that_are_not_running(holder: object) -> None:
    assert _decide(holder) is Redelivery.DROP


def test_lease_redelivery_gives_up_once_out_of_attempts() -> None:
    # Two lost workers are tolerated on top of a step's own attempts...
    assert _decide(_holder(attempt=1, max_attempts=1)) is Redelivery.TAKE_OVER
    assert _decide(_holder(attempt=2, max_attempts=1)) is Redelivery.TAKE_OVER
    assert _decide(_holder(attempt=3, max_attempts=1)) is Redelivery.GIVE_UP
    # ...so worker deaths never use up the retries a step has for its own exceptions.
    assert _decide(_holder(attempt=4, max_attempts=3)) is Redelivery.TAKE_OVER
    assert _decide(_holder(attempt=5, max_attempts=3)) is Redelivery.GIVE_UP


def test_backoff_bounds_grow_exponentially_to_the_cap() -> None:
    b = Backoff(base_s=0.25, cap_s=15, budget_s=600)
    assert [b.bound(n) for n in range(8)] == [0.25, 0.5, 1, 2, 4, 8, 15, 15]
    assert all(0 <= d <= b.bound(n) for n, d in zip(range(20), b.delays(), strict=False))


def test_backoff_retries_infrastructure_errors_until_success() -> None:
    slept: list[float] = []
    calls = iter(
        [ArtifactStoreUnavailableError("S3 down"), ArtifactStoreUnavailableError("S3 down"), "ok"]
    )

    def flaky() -> str:
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    out = call_with_backoff(flaky, what="t", policy=Backoff(), sleep=slept.append, rng=lambda: 1.0)

    assert out == "ok"
    assert slept == [0.25, 0.5]


def test_backoff_gives_up_at_its_budget_with_the_last_error() -> None:
    clock = [0.0]

    def sleep(d: float) -> None:
        clock[0] += d

    def down() -> None:
        raise ArtifactStoreUnavailableError("S3 at http://x is unavailable")

    with pytest.raises(ArtifactStoreUnavailableError, match="S3"):
        call_with_backoff(
            down,
            what="t",
            policy=Backoff(base_s=1, cap_s=4, budget_s=20),
            sleep=sleep,
            clock=lambda: clock[0],
            rng=lambda: 1.0,
        )
    assert 16 <= clock[0] <= 20


def test_backoff_does_not_retry_other_errors() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise MetadataStoreError("bad URL")

    with pytest.raises(MetadataStoreError):
        call_with_backoff(broken, what="t", policy=Backoff(), sleep=lambda _d: None)
    assert calls == [1]


def test_backoff_step_retry_delay_doubles_with_jitter_and_caps() -> None:
    from scheduler.backoff import retry_delay_s

    assert [retry_delay_s(n, 1.0, rng=lambda: 1.0) for n in (1, 2, 3, 7, 8)] == [1, 2, 4, 60, 60]
    assert retry_delay_s(1, 1.0, rng=lambda: 0.0) == 0.5
    assert retry_delay_s(3, 0.0) == 0.0
