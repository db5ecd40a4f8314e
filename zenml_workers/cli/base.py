"""The ``zw`` command group and what its commands share."""

from __future__ import annotations

import logging
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


def quiet_libraries() -> None:
    """Keep libraries' chatter out of our commands' logs: Alembic says at INFO which
    migrations it runs each time a process opens the metadata store."""
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group()
@click.option(
    "--stack-file", envvar="ZW_STACK_FILE", default=None, help="TOML stack file (ZW_STACK_FILE)."
)
@click.pass_context
def cli(ctx: click.Context, stack_file: str | None) -> None:
    """zenml-workers: ZenML-style pipelines on Celery workers."""
    quiet_libraries()
    ctx.ensure_object(dict)
    ctx.obj["stack_file"] = stack_file
