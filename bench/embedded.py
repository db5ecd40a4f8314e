"""Benchmarks of the embedded default: local process pool (2 workers), SQLite, a local folder.

The bench process submits every run itself, so the pool stays warm between runs
as it would in a notebook. ZenML figures are the published ones we were given;
everything else is measured here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.report import Result, median, progress
from bench.services import REPO_ROOT, service_env

__all__ = ["ZENML", "bench_cached", "bench_chain", "bench_fan", "bench_import", "embedded_settings"]

#: Published ZenML 0.98 figures, in seconds.
ZENML = {"chain10": 1.35, "fan_50": 4.4, "cached_chain10": 0.8, "import": 1.7}


def vs_zenml(
    name: str,
    zenml_key: str | None,
    description: str,
    value_s: float,
    raw: dict[str, Any],
    target: str = "",
) -> Result:
    """A timing result, compared with ZenML's published figure ``zenml_key`` when there is one."""
    zenml = ZENML[zenml_key] if zenml_key else None
    return Result(
        name=name,
        description=description,
        unit="s",
        value=value_s,
        baseline=zenml,
        baseline_source="ZenML 0.98 published" if zenml else "",
        ratio=zenml / value_s if zenml and value_s > 0 else None,
        ratio_meaning="ZenML / ours (speed-up)" if zenml else "",
        target=target,
        raw=raw,
    )


def embedded_settings(home: Path) -> Any:
    """Settings of the embedded default under ``home`` with 2 local worker processes."""
    from zenml_workers.settings import load_settings

    return load_settings(
        home=home, local_workers=2, broker_url=None, metadata_url=None, artifact_uri=None
    )


def run_timed(
    pipeline: Any,
    settings: Any,
    expect: str = "completed",
    timeout_s: float = 300.0,
    **params: Any,
) -> tuple[float, Any]:
    """Submit ``pipeline``, wait for it and check that every step ended ``expect``.

    Returns:
        The wall time in seconds, from ``submit()`` until ``wait()`` returned the finished
        run's view (as a user sees it), and that view.

    Raises:
        RunTimeoutError: the run did not end within ``timeout_s`` seconds.
        RuntimeError: a step ended otherwise (e.g. a cache hit in an uncached benchmark),
            which would make the number meaningless.
    """
    from zenml_workers.sdk.runner import submit

    started = time.perf_counter()
    from zenml_workers.errors import RunTimeoutError

    handle = submit(pipeline, settings=settings, **params)
    try:
        run = handle.wait(timeout_s, progress=False)
    except RunTimeoutError as e:
        raise RuntimeError(_stuck_reason(handle, settings, timeout_s)) from e
    wall = time.perf_counter() - started
    statuses = sorted({step.status for step in run.steps.values()})
    if statuses != [expect]:
        raise RuntimeError(
            f"a run of {pipeline.name} had steps {statuses}, expected only {expect!r}"
        )
    return wall, run


def _stuck_reason(handle: Any, settings: Any, timeout_s: float) -> str:
    """Say why a run did not end: unfinished steps, or every step done but the run still open."""
    from zenml_workers.sdk.client import Client

    run = Client(settings=settings).get_run(handle.id)
    statuses = sorted(step.status for step in run.steps.values())
    counts = {status: statuses.count(status) for status in set(statuses)}
    if set(counts) <= {"completed", "cached"}:
        return (
            f"run {run.id} is still {run.status!r} after {timeout_s:g} s although all its steps ended "
            f"({counts}): the final step commits raced and none marked the run completed"
        )
    return f"run {run.id} did not end within {timeout_s:g} s; its steps: {counts}"


def run_once(pipeline: Any, settings: Any, **params: Any) -> float:
    """Submit ``pipeline``, wait for it and return the wall time in seconds (all steps executed)."""
    return run_timed(pipeline, settings, **params)[0]


class Seeds:
    """Pipeline seeds far enough apart that no step of one run matches a step of another.

    A chain passes ``seed, seed + 1, ...`` along, so consecutive seeds would make most
    steps of the next run cache hits of the previous one.
    """

    STRIDE = 1_000_000

    def __init__(self, start: int = 1) -> None:
        self._next = start * self.STRIDE

    def __call__(self) -> int:
        self._next += self.STRIDE
        return self._next


def bench_chain(settings: Any, seeds: Seeds, repeats: int = 10) -> Result:
    """Benchmark 1: wall time of a 10-step chain after a warm-up run."""
    from bench.pipelines import CHAIN_LENGTH, chain

    warmup = run_once(chain, settings, seed=seeds())
    samples = [run_once(chain, settings, seed=seeds()) for _ in range(repeats)]
    wall = median(samples)
    progress(f"embedded 10-step chain: median {wall * 1000:.1f} ms over {repeats} runs")
    return vs_zenml(
        "embedded.chain10",
        "chain10",
        (
            f"{CHAIN_LENGTH}-step chain of trivial int steps on the embedded default (2 local worker "
            f"processes, SQLite, local folder); median wall time of {repeats} uncached runs after a warm-up"
        ),
        wall,
        {
            "samples_s": samples,
            "warmup_s": warmup,
            "per_step_s": wall / CHAIN_LENGTH,
            "steps": CHAIN_LENGTH,
        },
        target=">= 20x",
    )


def bench_fan(settings: Any, seeds: Seeds, repeats: int = 5, width: int = 50) -> Result:
    """Benchmark 2: wall time of a ``1 -> 50 -> 1`` fan-out/fan-in."""
    from bench.pipelines import fan_in

    warmup = run_once(fan_in, settings, seed=seeds(), width=width)
    samples = [run_once(fan_in, settings, seed=seeds(), width=width) for _ in range(repeats)]
    wall = median(samples)
    progress(
        f"embedded 1->{width}->1 fan-out/fan-in: median {wall * 1000:.0f} ms over {repeats} runs"
    )
    return vs_zenml(
        "embedded.fan_50",
        "fan_50",
        (
            f"1 -> {width} -> 1 fan-out/fan-in of trivial steps on the embedded default; "
            f"median wall time of {repeats} uncached runs after a warm-up"
        ),
        wall,
        {
            "samples_s": samples,
            "warmup_s": warmup,
            "steps": width + 2,
            "per_step_s": wall / (width + 2),
        },
    )


def bench_cached(settings: Any, seeds: Seeds, repeats: int = 10) -> list[Result]:
    """Benchmark 3: fully cached re-runs of the 10-step and the 100-step chain."""
    from bench.pipelines import chain, long_chain

    results = []
    for pipeline, steps, name in (
        (chain, 10, "embedded.cached_chain10"),
        (long_chain, 100, "embedded.cached_chain100"),
    ):
        seed = seeds()
        first = run_once(pipeline, settings, seed=seed)  # computes and stores every step
        samples = [
            run_timed(pipeline, settings, expect="cached", seed=seed)[0] for _ in range(repeats)
        ]
        wall = median(samples)
        progress(
            f"embedded cached {steps}-step re-run: median {wall * 1000:.1f} ms ({first * 1000:.0f} ms uncached)"
        )
        results.append(
            vs_zenml(
                name,
                "cached_chain10" if steps == 10 else None,
                (
                    f"fully cached re-run of a {steps}-step chain on the embedded default (every step a cache "
                    f"hit); median wall time of {repeats} re-runs"
                ),
                wall,
                {
                    "samples_s": samples,
                    "uncached_first_run_s": first,
                    "per_step_s": wall / steps,
                    "steps": steps,
                },
            )
        )
    return results


def _time_python(code: str, repeats: int) -> list[float]:
    env = service_env()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)
        samples.append(time.perf_counter() - started)
    return samples


def bench_import(repeats: int = 5) -> Result:
    """Benchmark 4: importing the SDK in a fresh interpreter, minus an empty interpreter.

    Measured on what a notebook's first cell does (the public API a pipeline needs), not on the
    bare package, whose ``__init__`` defers everything.
    """
    api = "from zenml_workers import Client, pipeline, step, submit, trainer"
    _time_python("pass", 1)  # warm the OS file cache
    _time_python(api, 1)
    empty = _time_python("pass", repeats)
    full = _time_python("import zenml_workers", repeats)
    bare = max(median(full) - median(empty), 0.0)
    public = _time_python(api, repeats)
    cost = max(median(public) - median(empty), 0.0)
    progress(f"import zenml_workers: {bare * 1000:.1f} ms; `{api}`: {cost * 1000:.0f} ms")
    return vs_zenml(
        "embedded.import",
        "import",
        (
            f"`python -c '{api}'` minus `python -c pass`, medians of {repeats} fresh "
            "subprocesses each (raw also has the bare `import zenml_workers`)"
        ),
        cost,
        {
            "empty_interpreter_s": empty,
            "import_zenml_workers_s": full,
            "public_api_import_s": public,
            "bare_import_cost_s": bare,
        },
    )
