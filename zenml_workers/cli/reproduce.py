"""``zw retry``, ``zw rerun`` and ``zw diff``: resume a run, reproduce it, compare two runs."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import click

from zenml_workers.cli.base import cli, settings_of


@cli.command()
@click.argument("run_id")
@click.option("--no-wait", is_flag=True, help="Return once the retry is planned.")
@click.pass_context
def retry(ctx: click.Context, run_id: str, no_wait: bool) -> None:
    """Resume a failed or cancelled run: reuse what finished, run the rest again.

    Uses the current code when the run's pipeline module is importable here, else the
    recorded code; says per step whether it is reused or runs again.
    """
    from zenml_workers.sdk.client import Client

    result = Client(settings_of(ctx)).retry(run_id)
    for line in result.lines():
        click.echo(line)
    if no_wait:
        return
    run = result.handle.wait(raise_on_failure=False)
    if run.status != "completed":
        sys.exit(1)


@cli.command()
@click.argument("run_id")
@click.option("--no-cache", is_flag=True, help="Execute every step (cache hits prove nothing).")
@click.option(
    "--current-stack", is_flag=True, help="Run on the current stack, not the recorded one."
)
@click.option("--timeout", "timeout_s", type=float, default=None, help="Seconds to wait at most.")
@click.pass_context
def rerun(
    ctx: click.Context, run_id: str, no_cache: bool, current_stack: bool, timeout_s: float | None
) -> None:
    """Execute a recorded run again and compare each output's content hash with the original.

    Exits 1 when an executed step's output differs or the rerun did not complete.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from zenml_workers.sdk.client import Client
    from zenml_workers.sdk.reproduce import CURRENT_STACK

    report = Client(settings_of(ctx)).rerun(
        run_id,
        no_cache=no_cache,
        stack=CURRENT_STACK if current_stack else None,
        timeout_s=timeout_s,
        progress=True,
    )
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(
        f"run {report.run_id} reran run {report.original_run_id} on {report.stack}: "
        f"{report.status}",
        markup=False,
    )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("step", no_wrap=True)
    table.add_column("result")
    for c in report.steps:
        table.add_row(c.invocation_id, c.detail)
    console.print(table)
    if report.reproduced:
        console.print("every re-executed step's outputs match the original", markup=False)
        return
    differing = ", ".join(c.invocation_id for c in report.differing) or "the run"
    console.print(f"not reproduced: {differing}", markup=False)
    sys.exit(1)


@cli.command()
@click.argument("run_a")
@click.argument("run_b")
@click.pass_context
def diff(ctx: click.Context, run_a: str, run_b: str) -> None:
    """What differs between two runs: code per step, parameters, input content hashes, git
    state, Python and package versions, and the stack."""
    from zenml_workers.sdk.client import Client

    for line in Client(settings_of(ctx)).diff(run_a, run_b).lines():
        click.echo(line)


def origin_text(origin: Mapping[str, Any]) -> str:
    """What ``zw show`` says a run came from (its recorded ``origin``)."""
    kind, source = origin.get("kind", "?"), origin.get("run_id", "?")
    pipeline = origin.get("pipeline", "?")
    if kind == "copy":
        swapped = ", ".join(origin.get("replaced") or []) or "no step"
        return f"copied from pipeline {pipeline!r} (run {source}), replacing {swapped}"
    if kind == "retry":
        return f"retry of run {source} with the {origin.get('code', 'recorded')} code"
    if kind == "rerun":
        cache = ", without the cache" if origin.get("no_cache") else ""
        return f"rerun of run {source} of pipeline {pipeline!r}{cache}"
    return f"came from run {source} ({kind})"
