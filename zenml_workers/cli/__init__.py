"""``zw``: run workers, the scheduler and Flower; inspect runs, logs and cache decisions.

Each module of this package adds its commands to :data:`cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from zenml_workers.cli import (  # noqa: F401  (register their commands)
    cache,
    ops,
    queues,
    reproduce,
    runs,
    services,
    stacks,
    usage,
)
from zenml_workers.cli.base import cli
from zenml_workers.errors import ZenMLWorkersError

__all__ = ["cli", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: turns our errors into one line and exit status 1."""
    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="zw", standalone_mode=False
        )
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ZenMLWorkersError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
