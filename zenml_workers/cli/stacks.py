"""``zw stack``: the active stack, and the stack records a team registers and shares.

Plain ``zw stack`` shows the settings in effect; its subcommands manage records in the
metadata store. They read the store named by the user's own settings (``ZW_METADATA_URL``
or the stack file), not the active record's, so they work while that record is broken.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from zenml_workers.cli.base import cli
from zenml_workers.sdk.stack_components import KEYS

if TYPE_CHECKING:
    from zenml_workers.sdk.client import Client
    from zenml_workers.sdk.stack_record import StackRecord

_HELP = {
    "orchestrator": "embedded (local worker processes) or celery (a broker and workers).",
    "broker_url": "Celery broker URL, without its password (redis://host:6379/0).",
    "broker_password": "Variable holding the broker's password (each user's own).",
    "queues": "Comma-separated queues steps may name.",
    "metadata_url": "Metadata store URL without its password (default: the store the record is in).",
    "metadata_password": "Variable holding the database password.",
    "artifact_uri": "Artifact store: a local path or s3://bucket/prefix.",
    "s3_endpoint_url": "S3 API endpoint (MinIO, SeaweedFS, ...).",
    "s3_region": "S3 region.",
    "s3_access_key_id": "Variable holding the S3 access key id.",
    "s3_secret_access_key": "Variable holding the S3 secret access key.",
    "secret_key": "Variable holding the team's signing key (ZW_SECRET_KEY).",
    "mlflow_tracking_uri": "MLflow tracking server of the experiment tracker.",
    "mlflow_experiment_name": "MLflow experiment (default: the pipeline's name).",
}


def _component_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``register``'s component flags, one per row of the record table (secrets: ``-env``
    and ``-file`` flags only, so a literal secret cannot be given)."""
    for key in reversed([k for k in KEYS if k.option != "experiment_tracker"]):
        name = key.option.replace("_", "-")
        if key.kind == "secret":
            fn = click.option(
                f"--{name}-file", key.option + "_file", metavar="PATH", help="Or a file holding it."
            )(fn)
            fn = click.option(
                f"--{name}-env", key.option + "_env", metavar="VAR", help=_HELP[key.option]
            )(fn)
        elif key.option == "orchestrator":
            fn = click.option(
                "--orchestrator",
                type=click.Choice(["embedded", "celery"]),
                help=_HELP["orchestrator"],
            )(fn)
        else:
            fn = click.option(f"--{name}", key.option, help=_HELP[key.option])(fn)
    return fn


def _client(ctx: click.Context) -> Client:
    from zenml_workers.sdk.client import Client
    from zenml_workers.settings import load_settings

    return Client(load_settings(ctx.obj.get("stack_file"), apply_active_stack=False))


@cli.group(invoke_without_command=True)
@click.pass_context
def stack(ctx: click.Context) -> None:
    """Show the active stack (credentials hidden), or manage the team's stack records."""
    if ctx.invoked_subcommand is not None:
        return
    from zenml_workers.cli.base import settings_of
    from zenml_workers.sdk.stacks import ACTIVE_STACK_FILE, active_stack_name

    settings = settings_of(ctx)
    record = active_stack_name(settings.home)
    source = (
        f"stack record {record!r} (set in {settings.home / ACTIVE_STACK_FILE}), under your "
        "environment and stack file"
        if record
        else "environment, stack file and defaults (no stack record set)"
    )
    lines: dict[str, Any] = {**settings.describe(), "source": source, "user": settings.user}
    lines["queues"] = ", ".join(settings.queues)
    if settings.resolved_artifact_uri().startswith("s3://"):
        lines["s3_endpoint_url"] = settings.s3_endpoint_url or "AWS"
        lines["s3_region"] = settings.s3_region or "-"
    lines["signing_key"] = "set" if settings.signing_keys()[0] else "not set"
    if settings.mlflow_tracking_uri:
        lines["experiment_tracker"] = f"mlflow {settings.mlflow_tracking_uri}"
    for key, value in lines.items():
        click.echo(f"{key}: {value}")


@stack.command("register")
@click.argument("name")
@click.option("-f", "--file", "path", default=None, help="Register from a TOML stack file instead.")
@click.option("--share", is_flag=True, help="Visible to every user of the store at once.")
@click.option("--description", default="", help="What the stack is for.")
@_component_options
@click.pass_context
def register(
    ctx: click.Context, name: str, path: str | None, share: bool, description: str, **options: Any
) -> None:
    """Register stack NAME from flags or a TOML file; secrets only as -env/-file references."""
    from zenml_workers.errors import StackRecordError

    given = {k: v for k, v in options.items() if v is not None}
    client = _client(ctx)
    if path:
        if given or description:
            raise StackRecordError(
                f"give the stack either as a file (-f {path}) or as flags, not both; nothing "
                "was written"
            )
        record = client.import_stack(Path(path), name=name, share=share)
    else:
        if "queues" in given:
            given["queues"] = [q.strip() for q in given["queues"].split(",") if q.strip()]
        record = client.register_stack(name, share=share, description=description, **given)
    _registered(record)


def _registered(record: StackRecord) -> None:
    who = "shared: every user sees it" if record.shared else f"private: only {record.owner} sees it"
    click.echo(f"registered stack {record.name!r} ({record.orchestrator}, {who})")
    if not record.shared:
        click.echo(f"share it with `zw stack share {record.name}`")


@stack.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """List the stacks you can see: who registered each, shared or private, the active one."""
    client = _client(ctx)
    active = client.active_stack()
    rows = [("", "name", "owner", "visibility", "orchestrator", "description")]
    for r in client.list_stacks():
        marker = "*" if r.name == active else ""
        visibility = "shared" if r.shared else "private"
        rows.append((marker, r.name, r.owner, visibility, r.orchestrator, r.description))
    if len(rows) == 1:
        click.echo("no stack records yet; register one with `zw stack register NAME ...`")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]).rstrip())


@stack.command("describe")
@click.argument("name")
@click.pass_context
def describe(ctx: click.Context, name: str) -> None:
    """Show every setting of stack NAME; secrets as the variable ($VAR) or file they come from."""
    for label, text in _client(ctx).get_stack(name).describe():
        click.echo(f"{label}: {text}")


@stack.command("share")
@click.argument("name")
@click.pass_context
def share(ctx: click.Context, name: str) -> None:
    """Make your stack NAME visible to every user of the metadata store."""
    _client(ctx).share_stack(name)
    click.echo(f"stack {name!r} is shared: every user of this metadata store sees it")


@stack.command("set")
@click.argument("name")
@click.pass_context
def set_(ctx: click.Context, name: str) -> None:
    """Make NAME the active stack of your home (ZW_HOME); `default` leaves the records."""
    import os

    client = _client(ctx)
    client.set_active_stack(name)
    if name == "default":
        click.echo("active stack: default (your environment and stack file only)")
        return
    click.echo(f"active stack: {name}")
    for where, ref in client.get_stack(name).references().items():
        if ref.env and not os.environ.get(ref.env):
            click.echo(f"note: {where} comes from ${ref.env}, which is not set in this shell")


@stack.command("export")
@click.argument("name")
@click.pass_context
def export(ctx: click.Context, name: str) -> None:
    """Print stack NAME as TOML (references only, no secret) for `zw stack import`."""
    click.echo(_client(ctx).export_stack(name), nl=False)


@stack.command("import")
@click.argument("path")
@click.option("--name", default=None, help="Register under this name instead of the file's.")
@click.option("--share", is_flag=True, help="Visible to every user of the store at once.")
@click.pass_context
def import_(ctx: click.Context, path: str, name: str | None, share: bool) -> None:
    """Register a stack from a TOML file written by `zw stack export` (or a stack file)."""
    _registered(_client(ctx).import_stack(Path(path), name=name, share=share))


@stack.command("delete")
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, name: str) -> None:
    """Delete your stack NAME."""
    _client(ctx).delete_stack(name)
    click.echo(f"deleted stack {name!r}")
