"""``zw cache list`` / ``zw cache clear`` and ``zw gc``: the team's shared cache and its storage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from zenml_workers.cli.base import cli, settings_of, when

if TYPE_CHECKING:
    from zenml_workers.sdk.cache_admin import CheckReport, GcReport
    from zenml_workers.sdk.client import Client


def size_text(size_bytes: int) -> str:
    """``"512 B"``, ``"1.5 KiB"``, ``"3.2 GiB"``: a size in binary units, three figures."""
    value, unit = float(size_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 artifact"``, ``"3 artifacts"``."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def _client(ctx: click.Context) -> Client:
    from zenml_workers.sdk.client import Client

    return Client(settings_of(ctx))


def _age(ctx: click.Context, value: str | None, what: str) -> str | None:
    """Check an ``--older-than`` value up front, so a typo fails before anything connects."""
    from zenml_workers.errors import CacheError
    from zenml_workers.sdk.cache_admin import period_seconds

    if value is not None:
        try:
            period_seconds(value, what)
        except CacheError as e:
            raise click.BadParameter(str(e), ctx=ctx, param_hint="--older-than") from e
    return value


@cli.group()
def cache() -> None:
    """List and clear the shared cache (step outputs a later identical step reuses)."""


@cache.command("list")
@click.option("--pipeline", "-p", default=None, help="Only entries of this pipeline.")
@click.option("--step", "-s", default=None, help="Only entries of this step.")
@click.option(
    "--all", "show_all", is_flag=True, help="Also cleared, expired and lost entries (state column)."
)
@click.option("--limit", type=int, default=100, show_default=True, help="Show the newest N.")
@click.pass_context
def list_(
    ctx: click.Context, pipeline: str | None, step: str | None, show_all: bool, limit: int
) -> None:
    """One line per cache entry: key, pipeline, step, size, run and user that made it, hits,
    last use and expiry (UTC), newest first."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    entries = _client(ctx).list_cache(pipeline, step, include_expired=show_all, limit=limit)
    if not entries:
        click.echo("no cache entries" + (" match" if pipeline or step else ""))
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for header in ("key", "pipeline", "step", "size", "run", "user", "hits", "last used"):
        table.add_column(header, no_wrap=True, justify="right" if header == "hits" else "left")
    table.add_column("expires", no_wrap=True)
    if show_all:
        table.add_column("state", no_wrap=True)
    for e in entries:
        cells = [
            e.cache_key.removeprefix("sha256:")[:12],
            e.pipeline,
            e.step,
            size_text(e.size_bytes),
            e.run_id[:8],
            e.user or "-",
            str(e.hits),
            when(e.last_used_at)[:16],
            "never" if e.expires_at is None else when(e.expires_at)[:16],
        ]
        table.add_row(*cells, *([e.state] if show_all else []))
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)  # piped: no squeezing to 80 columns
    console.print(table)
    total = sum(e.size_bytes for e in entries)
    more = f" (the newest {limit}; see more with --limit)" if len(entries) == limit else ""
    console.print(
        f"{counted(len(entries), 'entry', 'entries')}, {size_text(total)}{more}", soft_wrap=True
    )


@cache.command()
@click.option("--pipeline", "-p", default=None, help="Entries of this pipeline.")
@click.option("--step", "-s", default=None, help="Entries of this step.")
@click.option("--run", "run_id", default=None, help="Entries made by this run (id or prefix).")
@click.option("--older-than", default=None, help="Entries made longer ago, e.g. 7d or 12h.")
@click.option("--yes", "-y", is_flag=True, help="Clear every entry without asking.")
@click.pass_context
def clear(
    ctx: click.Context,
    pipeline: str | None,
    step: str | None,
    run_id: str | None,
    older_than: str | None,
    yes: bool,
) -> None:
    """Stop offering matching entries as cache hits, so those steps compute again next time.

    Runs keep their history. With no filter every entry is cleared, after asking.
    """
    _age(ctx, older_than, "--older-than")
    if not (pipeline or step or run_id or older_than or yes):
        click.confirm("Clear every cache entry of the team?", abort=True)
    n = _client(ctx).clear_cache(pipeline=pipeline, step=step, run=run_id, older_than=older_than)
    click.echo(f"cleared {counted(n, 'cache entry', 'cache entries')}")


@cli.command()
@click.option(
    "--older-than",
    default=None,
    help="Delete artifacts that no run newer than this (e.g. 30d) and no running run refers to.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@click.option(
    "--check",
    is_flag=True,
    help="Read every artifact back and report (and stop reusing) those gone or altered.",
)
@click.pass_context
def gc(ctx: click.Context, older_than: str | None, dry_run: bool, check: bool) -> None:
    """Delete old artifacts (metadata and object) and check the ones that stay.

    Runs that are running, or ended less than --older-than ago, keep everything they refer
    to, including what their steps were cached from. Run records are never deleted.
    """
    if older_than is None and not check:
        raise click.UsageError("give --older-than AGE (e.g. 30d), --check, or both")
    _age(ctx, older_than, "--older-than")
    client = _client(ctx)
    if check:
        _report_check(client.check_artifacts())
    if older_than is not None:
        _report_gc(client.gc(older_than, dry_run=dry_run))


def _report_check(report: CheckReport) -> None:
    for art in report.lost:
        click.echo(
            f"{art.problem}: artifact {art.id[:8]} {art.name!r} of run {art.producer_run_id[:8]} "
            f"at {art.uri}"
        )
    restored = f", {report.restored} found intact again" if report.restored else ""
    click.echo(
        f"checked {counted(report.checked, 'artifact')}: {len(report.missing)} missing, "
        f"{len(report.corrupted)} corrupted{restored}"
        + ("; their steps will run again instead of being cache hits" if report.lost else "")
    )


def _report_gc(report: GcReport) -> None:
    what = f"{counted(report.artifacts, 'artifact')} ({size_text(report.size_bytes)})"
    cutoff = when(report.cutoff)[:16]
    if report.dry_run:
        click.echo(f"would delete {what} not referenced by runs since {cutoff} UTC (dry run)")
        return
    click.echo(f"deleted {what} not referenced by runs since {cutoff} UTC")
    if report.in_use:
        click.echo(f"kept {counted(report.in_use, 'artifact')} that a run started using meanwhile")
    for uri in report.failed_uris:
        click.echo(f"warning: could not delete the object {uri} (nothing refers to it)", err=True)
