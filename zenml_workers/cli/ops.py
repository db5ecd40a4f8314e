"""``zw dead-letters``: what the broker dropped (``zw stack`` lives in ``cli/stacks.py``)."""

from __future__ import annotations

import click

from zenml_workers.cli.base import cli, settings_of, when


@cli.command("dead-letters")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Records to list."
)
@click.option("--clear", is_flag=True, help="Empty the list after listing it.")
@click.pass_context
def dead_letters(ctx: click.Context, limit: int, clear: bool) -> None:
    """List the messages workers dropped as unreadable, newest first."""
    from zenml_workers.worker.broker import DEAD_LETTER_KEY, DeadLetterList

    settings = settings_of(ctx)
    if settings.is_embedded:
        click.echo(
            "there is no broker on the embedded default, so no dead letters; "
            "set ZW_BROKER_URL to read a cluster's"
        )
        return
    dead = DeadLetterList.from_url(settings.reveal_broker_url(), settings.broker_ssl_options())
    try:
        letters = dead.newest(limit)
        if not letters:
            click.echo(f"no dead letters in {DEAD_LETTER_KEY} on {settings.broker_url}")
        for letter in letters:
            if isinstance(letter, str):
                click.echo(f"-  ?  not a dead-letter record  {letter[:80]!r}")
                continue
            click.echo(f"{when(letter.at)}  {letter.queue}  {letter.reason}  {letter.raw[:80]!r}")
        if clear:
            click.echo(f"cleared {dead.clear()} record(s) from {DEAD_LETTER_KEY}")
    finally:
        dead.client.close()
