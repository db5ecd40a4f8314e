"""Live step logs on the embedded default: how soon a printed line can be read, and what
capturing costs a step.

- Latency: a step prints ``mark I <epoch>`` lines 0.17 s apart; the bench process polls
  ``Client().logs()`` every 10 ms and records, per line, when it first saw it minus when
  it was printed (same machine, same clock).
- Cost: the 10-step chain of silent steps (``bench.pipelines.chain``) against the same
  chain whose steps each print one line, run alternately; and, in-process, the capture's
  own cost for a step that prints nothing (entering and leaving it) and per printed line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from bench.report import Result, median, progress
from zenml_workers.sdk.pipeline import pipeline
from zenml_workers.sdk.step import step

__all__ = ["bench_logs"]

#: Seconds between two polls of ``Client().logs()`` while measuring the latency.
POLL_S = 0.01


@step(enable_cache=False)
def marks(count: int, gap_s: float) -> Annotated[int, "count"]:
    """Print ``mark I <epoch seconds>`` ``count`` times, ``gap_s`` apart."""
    for i in range(count):
        print(f"mark {i} {time.time():.6f}")
        time.sleep(gap_s)
    return count


@pipeline(enable_cache=False)
def marking(count: int = 20, gap_s: float = 0.17) -> None:
    marks(count, gap_s)


@step
def loud_start(seed: int) -> Annotated[int, "value"]:
    print(f"starting from {seed}")
    return seed


@step
def loud_inc(x: int) -> Annotated[int, "value"]:
    print(f"adding one to {x}")
    return x + 1


@pipeline
def loud_chain(seed: int = 0) -> None:
    """The 10-step chain, each step printing one line."""
    value = loud_start(seed)
    for _ in range(9):
        value = loud_inc(value)


def _latency(settings: Any, count: int) -> dict[str, Any]:
    from zenml_workers.sdk.client import Client
    from zenml_workers.sdk.runner import submit

    client = Client(settings)
    handle = submit(marking, settings=settings, count=count, gap_s=0.17)
    seen: dict[int, float] = {}
    polls: list[float] = []
    deadline = time.monotonic() + 60 + count
    while len(seen) < count and time.monotonic() < deadline:
        started = time.perf_counter()
        text = client.logs(handle.id, "marks")
        polls.append(time.perf_counter() - started)
        now = time.time()
        for line in text.splitlines():
            if line.startswith("mark "):
                _, i, printed = line.split()
                seen.setdefault(int(i), now - float(printed))
        time.sleep(POLL_S)
    handle.wait(timeout_s=60, progress=False)
    if len(seen) < count:
        raise RuntimeError(f"only {len(seen)} of {count} printed lines became visible in time")
    samples = [seen[i] for i in sorted(seen)]
    return {"samples_s": samples, "poll_call_s": median(polls), "polls": len(polls)}


def _chains(settings: Any, repeats: int) -> tuple[list[float], list[float]]:
    from bench.embedded import Seeds, run_once
    from bench.pipelines import chain

    seeds = Seeds(start=9_000)
    run_once(chain, settings, seed=seeds())  # warm-ups
    run_once(loud_chain, settings, seed=seeds())
    silent, loud = [], []
    for _ in range(repeats):
        silent.append(run_once(chain, settings, seed=seeds()))
        loud.append(run_once(loud_chain, settings, seed=seeds()))
    return silent, loud


def _capture_on_off(workdir: Path, rounds: int, runs: int) -> tuple[list[float], list[float]]:
    """The silent 10-step chain with the capture as it is, and with ``execute.capture_logs``
    replaced by a no-op (in the bench process, so the forked pool inherits it); each round
    starts a fresh pool per variant and discards its first run."""
    import contextlib
    from collections.abc import Iterator
    from types import SimpleNamespace

    from bench.embedded import Seeds, embedded_settings, run_once
    from bench.pipelines import chain
    from zenml_workers.sdk.stack import close_stacks
    from zenml_workers.worker import execute

    @contextlib.contextmanager
    def no_capture(*_args: Any, **_kwargs: Any) -> Iterator[Any]:
        yield SimpleNamespace(final=None, leftover="")

    real = execute.capture_logs
    settings = embedded_settings(workdir / "logs-onoff-home")
    seeds = Seeds(start=12_000)
    on: list[float] = []
    off: list[float] = []
    try:
        for i in range(rounds):
            variants = [(on, real), (off, no_capture)]
            for samples, capture in variants if i % 2 == 0 else variants[::-1]:
                execute.capture_logs = capture  # type: ignore[assignment]
                try:
                    run_once(chain, settings, seed=seeds())  # starts the pool
                    samples.extend(run_once(chain, settings, seed=seeds()) for _ in range(runs))
                finally:
                    close_stacks()
    finally:
        execute.capture_logs = real  # type: ignore[assignment]
    return on, off


def _in_process(calls: int) -> tuple[float, float]:
    """Seconds per silent capture (enter and leave) and per printed line, in this process."""
    import io
    import sys

    from zenml_workers.worker.logcapture import capture_logs

    def stored(_batch: Any) -> bool:
        return True

    started = time.perf_counter()
    for _ in range(calls):
        with capture_logs(stored, flush_interval_s=None):
            pass
    silent = (time.perf_counter() - started) / calls
    real_stdout = sys.stdout
    sys.stdout = io.StringIO()  # the passthrough: a cheap stream, to time the capture alone
    try:
        with capture_logs(stored, flush_interval_s=None):
            started = time.perf_counter()
            for i in range(calls):
                print("epoch 3 loss 0.4213 accuracy 0.8812 step", i)
            per_line = (time.perf_counter() - started) / calls
    finally:
        sys.stdout = real_stdout
    return silent, per_line


def bench_logs(workdir: Path, *, quick: bool = False) -> list[Result]:
    """Latency of a printed line to ``Client().logs()`` and the cost of capturing a step."""
    from bench.embedded import embedded_settings
    from zenml_workers.sdk.stack import close_stacks

    settings = embedded_settings(workdir / "logs-home")
    try:
        latency = _latency(settings, count=10 if quick else 20)
        silent, loud = _chains(settings, repeats=5 if quick else 10)
    finally:
        close_stacks()
    capture_s, line_s = _in_process(2_000 if quick else 10_000)
    on, off = _capture_on_off(workdir, rounds=2 if quick else 4, runs=4 if quick else 5)
    on_s, off_s = median(on), median(off)
    lat = sorted(latency["samples_s"])
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    silent_s, loud_s = median(silent), median(loud)
    per_step_s = silent_s / 10
    progress(
        f"log latency: median {median(lat) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {lat[-1] * 1000:.0f} ms over {len(lat)} lines (poll {POLL_S * 1000:.0f} ms, "
        f"one Client().logs() call {latency['poll_call_s'] * 1000:.1f} ms)"
    )
    progress(
        f"10-step chain: silent steps {silent_s * 1000:.1f} ms, each step printing a line "
        f"{loud_s * 1000:.1f} ms ({(loud_s - silent_s) / 10 * 1000:+.2f} ms per step)"
    )
    progress(
        f"silent 10-step chain with the capture {on_s * 1000:.1f} ms, with a no-op instead "
        f"{off_s * 1000:.1f} ms ({(on_s - off_s) / 10 * 1000:+.2f} ms per step, "
        f"{len(on)} runs each)"
    )
    progress(
        f"capture of a silent step: {capture_s * 1e6:.1f} us ({capture_s / per_step_s:.2%} of a "
        f"chain step); per printed line: {line_s * 1e6:.2f} us"
    )
    return [
        Result(
            name="logs.latency",
            description=(
                "a line printed by a running step until Client().logs() shows it, on the "
                f"embedded default (SQLite); median of {len(lat)} lines 0.17 s apart, polled "
                f"every {POLL_S * 1000:.0f} ms (the writer stores every 0.5 s)"
            ),
            unit="s",
            value=median(lat),
            raw={**latency, "p95_s": p95, "max_s": lat[-1]},
        ),
        Result(
            name="logs.chain10_printing",
            description=(
                "the embedded 10-step chain with each step printing one line (stored as it "
                "runs, plus the final write before the commit) against the same chain of "
                f"silent steps; medians of {len(silent)} alternating runs"
            ),
            unit="s",
            value=loud_s,
            baseline=silent_s,
            baseline_source="silent chain, same run",
            ratio=loud_s / silent_s if silent_s > 0 else None,
            ratio_meaning="printing / silent",
            raw={"silent_samples_s": silent, "printing_samples_s": loud},
        ),
        Result(
            name="logs.chain10_capture_cost",
            description=(
                "the embedded 10-step chain of silent steps with the log capture, against the "
                "same chain with the capture replaced by a no-op in the worker processes; "
                f"medians of {len(on)} runs each, in alternating rounds on fresh pools"
            ),
            unit="s",
            value=on_s,
            baseline=off_s,
            baseline_source="no capture, same run",
            ratio=on_s / off_s if off_s > 0 else None,
            ratio_meaning="with / without capture",
            raw={"with_capture_samples_s": on, "without_capture_samples_s": off},
        ),
        Result(
            name="logs.capture_silent_step",
            description=(
                "capturing a step that prints nothing: entering and leaving the capture "
                "(stream swap, logging handler, no thread, no write), in-process; the "
                "baseline is one step of the silent chain"
            ),
            unit="s",
            value=capture_s,
            baseline=per_step_s,
            baseline_source="a silent chain step, same run",
            ratio=capture_s / per_step_s if per_step_s > 0 else None,
            ratio_meaning="capture / step",
            raw={"per_printed_line_s": line_s},
        ),
    ]
