"""``zw runs``, ``show``, ``logs``, ``explain`` and ``cancel``: what ran, and stopping it."""

from __future__ import annotations

import click

from zenml_workers.cli.base import cli, settings_of, when


@cli.command()
@click.option("--pipeline", "-p", default=None)
@click.option("--limit", type=int, default=20, show_default=True)
@click.pass_context
def runs(ctx: click.Context, pipeline: str | None, limit: int) -> None:
    """List recent runs."""
    from rich.console import Console
    from rich.table import Table

    from zenml_workers.sdk.client import Client

    table = Table("run", "pipeline", "status", "steps", "cached", "created (UTC)", "duration")
    for run in Client(settings_of(ctx)).list_runs(pipeline=pipeline, limit=limit):
        cached = sum(1 for s in run.steps.values() if s.is_cached)
        duration = f"{run.duration_s:.2f}s" if run.duration_s is not None else "-"
        table.add_row(
            run.id[:8],
            run.pipeline,
            run.status,
            str(len(run.steps)),
            str(cached),
            when(run.created_at),
            duration,
        )
    Console().print(table)


@cli.command()
@click.argument("run_id")
@click.pass_context
def show(ctx: click.Context, run_id: str) -> None:
    """Show a run's steps, where they ran, and its message."""
    from rich.console import Console
    from rich.table import Table

    from zenml_workers.sdk.client import Client
    from zenml_workers.sdk.runner import RunHandle
    from zenml_workers.sdk.stack import get_stack

    stack = get_stack(settings_of(ctx))
    run = Client(stack.settings).get_run(run_id)
    console = Console()
    console.print(
        f"run [bold]{run.id}[/bold] of [bold]{run.pipeline}[/bold]: {run.status} {run.message}"
    )
    if run.status == "running":
        for queue, steps in RunHandle(run.id, stack).blocked_queues().items():
            console.print(
                f"[yellow]warning:[/yellow] step(s) {', '.join(steps)} wait on queue {queue!r}, "
                f"which no live worker consumes; start one with `zw worker --queues {queue}`"
            )
    table = Table("step", "status", "queue", "attempt", "host", "duration", "outputs")
    for st in run.steps.values():
        duration = f"{st.duration_s:.3f}s" if st.duration_s is not None else "-"
        table.add_row(
            st.invocation_id,
            st.status,
            st.queue,
            str(st.attempt),
            st.worker_host or "-",
            duration,
            ", ".join(st.outputs),
        )
    console.print(table)


@cli.command()
@click.argument("run_id")
@click.argument("step")
@click.pass_context
def logs(ctx: click.Context, run_id: str, step: str) -> None:
    """Print a step's captured stdout, stderr and logging."""
    from zenml_workers.sdk.client import Client

    click.echo(Client(settings_of(ctx)).logs(run_id, step), nl=False)


@cli.command()
@click.argument("run_id")
@click.argument("step")
@click.pass_context
def explain(ctx: click.Context, run_id: str, step: str) -> None:
    """Say why a step was, or was not, a cache hit."""
    from zenml_workers.sdk.client import Client

    for reason in Client(settings_of(ctx)).explain_cache(run_id, step):
        click.echo(f"- {reason}")


@cli.command()
@click.argument("run_id")
@click.pass_context
def cancel(ctx: click.Context, run_id: str) -> None:
    """Cancel a run: revoke queued steps and stop running ones."""
    from zenml_workers.sdk.runner import RunHandle
    from zenml_workers.sdk.stack import get_stack

    stack = get_stack(settings_of(ctx))
    from zenml_workers.sdk.client import Client

    run = Client(stack.settings).get_run(run_id)
    RunHandle(run.id, stack).cancel()
    click.echo(f"cancelled run {run.id}")
