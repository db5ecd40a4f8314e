"""``zw runs``, ``show``, ``logs``, ``explain`` and ``cancel``: what ran, and stopping it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from zenml_workers.cli.base import cli, settings_of, when

if TYPE_CHECKING:
    from zenml_workers.sdk.resources import RunCost, StepCost


@cli.command()
@click.option("--pipeline", "-p", default=None)
@click.option("--user", "-u", default=None, help="Only this user's runs (their ZW_USER).")
@click.option("--limit", type=int, default=20, show_default=True)
@click.pass_context
def runs(ctx: click.Context, pipeline: str | None, user: str | None, limit: int) -> None:
    """List recent runs: who ran them, how they ended, how long they took."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from zenml_workers.sdk.client import Client
    from zenml_workers.sdk.progress import duration

    # Fits 100 columns: long pipeline and user names are cut with an ellipsis, not wrapped.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("run", no_wrap=True)
    table.add_column("pipeline", max_width=20, no_wrap=True, overflow="ellipsis")
    table.add_column("user", max_width=12, no_wrap=True, overflow="ellipsis")
    table.add_column("status", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("cached", justify="right", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    for run in Client(settings_of(ctx)).list_runs(pipeline=pipeline, user=user, limit=limit):
        cached = sum(1 for s in run.steps.values() if s.is_cached)
        table.add_row(
            run.id[:8],
            run.pipeline,
            run.user or "-",
            run.status,
            str(len(run.steps)),
            str(cached),
            when(run.created_at)[:16],
            "-" if run.duration_s is None else duration(run.duration_s),
        )
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=100)  # piped: not rich's 80 columns
    console.print(table)


@cli.command()
@click.argument("run_id")
@click.pass_context
def show(ctx: click.Context, run_id: str) -> None:
    """Show a run's steps, where they ran, and its message."""
    from rich.console import Console
    from rich.table import Column, Table

    from zenml_workers.sdk.client import Client
    from zenml_workers.sdk.runner import RunHandle
    from zenml_workers.sdk.stack import get_stack

    stack = get_stack(settings_of(ctx))
    run = Client(stack.settings).get_run(run_id)
    console = Console()
    if not console.is_terminal:
        # Piped or captured: rich would squeeze the table into 80 columns and cut host names.
        console = Console(width=160)
    console.print(
        f"run [bold]{run.id}[/bold] of [bold]{run.pipeline}[/bold]: {run.status} {run.message}"
    )
    who = f"by {run.user or '-'}, {_git_text(run.environment.get('git') or {})}"
    console.print(who, markup=False, highlight=False)
    if run.origin:
        from zenml_workers.cli.reproduce import origin_text

        console.print(origin_text(run.origin), markup=False, highlight=False)
    if run.status == "running":
        for queue, steps in RunHandle(run.id, stack).blocked_queues().items():
            console.print(
                f"[yellow]warning:[/yellow] step(s) {', '.join(steps)} wait on queue {queue!r}, "
                f"which no live worker consumes; start one with `zw worker --queues {queue}`"
            )
    cost_columns = [Column(h, justify="right", no_wrap=True) for h in ("cpu-s", "gpu-s")]
    table = Table(
        "step", "status", "queue", "attempt", "host", "duration", *cost_columns, "outputs"
    )
    for st in run.steps.values():
        duration = f"{st.duration_s:.3f}s" if st.duration_s is not None else "-"
        table.add_row(
            st.invocation_id,
            st.status,
            st.queue,
            str(st.attempt),
            st.worker_host or "-",
            duration,
            *_cost_cells(st.cost),
            ", ".join(st.outputs),
        )
    console.print(table)
    for st in run.steps.values():
        if st.tracker is not None:
            # One line per tracked step, so the id can be copied into MLflow's UI or client.
            where = st.tracker.url or st.tracker.tracking_uri
            console.print(
                f"MLflow run of step {st.invocation_id}: {st.tracker.run_id} "
                f"(parent {st.tracker.parent_run_id}, experiment {st.tracker.experiment_id}) "
                f"at {where}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    for line in _cost_lines(run.cost):
        console.print(line, highlight=False, soft_wrap=True)


def _cost_cells(cost: StepCost) -> tuple[str, str]:
    """CPU- and GPU-seconds of a step (all attempts); a cache hit's saved ones in brackets."""
    from zenml_workers.cli.usage import seconds_text

    if not cost.measured:
        return "-", "-"
    if cost.attempts == 0:
        return f"({seconds_text(cost.saved_cpu_s)})", f"({seconds_text(cost.saved_gpu_s)})"
    return seconds_text(cost.total_cpu_s), seconds_text(cost.total_gpu_s)


def _cost_lines(cost: RunCost) -> list[str]:
    from zenml_workers.cli.usage import seconds_text

    return [
        f"cost: {seconds_text(cost.cpu_s)} cpu-s, {seconds_text(cost.gpu_s)} gpu-s "
        "(failed attempts included)",
        f"saved by cache hits: {seconds_text(cost.saved_cpu_s)} cpu-s, "
        f"{seconds_text(cost.saved_gpu_s)} gpu-s (in brackets above)",
    ]


def _git_text(git: dict[str, Any]) -> str:
    """``"git 5f02388 (main, uncommitted changes)"``, from a run's recorded environment."""
    if not git.get("commit"):
        return "code not in a git checkout" if not git else "git: no commit yet"
    notes = [git["branch"]] if git.get("branch") else []
    if git.get("dirty"):
        notes.append("uncommitted changes")
    return f"git {git['commit'][:12]}" + (f" ({', '.join(notes)})" if notes else "")


@cli.command()
@click.argument("run_id")
@click.argument("step")
@click.option(
    "--follow", "-f", is_flag=True, help="Print new lines as they come, until the step ends."
)
@click.option("--attempt", type=int, default=None, help="Show this attempt (default: the latest).")
@click.option(
    "--timestamps", "-t", is_flag=True, help="Start each line with its time (UTC) and stream."
)
@click.pass_context
def logs(
    ctx: click.Context,
    run_id: str,
    step: str,
    follow: bool,
    attempt: int | None,
    timestamps: bool,
) -> None:
    """Print a step's captured stdout, stderr and logging (-f: while it runs, until it ends)."""
    import sys

    from zenml_workers.sdk.client import Client

    client = Client(settings_of(ctx))
    if not follow and not timestamps:
        click.echo(client.logs(run_id, step, attempt=attempt), nl=False)
        return
    out = sys.stdout
    lines = (
        client.follow_logs(run_id, step, attempt=attempt)
        if follow
        else client.log_lines(run_id, step, attempt=attempt)
    )
    shown = attempt
    for line in lines:
        if follow and shown is not None and line.attempt != shown:
            click.echo(f"--- attempt {line.attempt} ---", err=True)
        shown = line.attempt
        text = line.render()
        if timestamps:
            stamp = "-" if line.ts is None else when(line.ts) + f".{int(line.ts * 1000) % 1000:03d}"
            text = f"{stamp} {line.stream or 'stored':6} {text}"
        out.write(text)
        if follow:
            out.flush()


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
