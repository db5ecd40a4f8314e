"""The ``zw`` command group and what its commands share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click


def settings_of(ctx: click.Context) -> Any:
    from zenml_workers.settings import load_settings

    return load_settings(ctx.obj.get("stack_file"))


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
@click.option(
    "--stack-file", envvar="ZW_STACK_FILE", default=None, help="TOML stack file (ZW_STACK_FILE)."
)
@click.pass_context
def cli(ctx: click.Context, stack_file: str | None) -> None:
    """zenml-workers: ZenML-style pipelines on Celery workers."""
    ctx.ensure_object(dict)
    ctx.obj["stack_file"] = stack_file
