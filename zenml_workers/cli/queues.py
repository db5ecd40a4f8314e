"""``zw queues``: each queue's demand and workers, and how many workers it wants."""

from __future__ import annotations

import json
import time

import click

from zenml_workers.cli.base import cli, settings_of

FORMULA = "wanted = min(--max-workers, ceil((ready + running) / concurrency per worker))"


@cli.command()
@click.option(
    "--max-workers",
    type=click.IntRange(min=0),
    default=None,
    help="Never want more workers than this per queue (default: unbounded).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Concurrency per worker assumed for a queue no live worker reports one for "
    "(e.g. the --concurrency your autoscaled workers start with).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue, one a line.")
@click.pass_context
def queues(ctx: click.Context, max_workers: int | None, concurrency: int, as_json: bool) -> None:
    """Show each queue's steps (ready, on the broker, running), its live workers and their
    concurrency, and the workers it wants.

    ready: steps whose inputs exist and that have not started, waiting in SQL for a slot in
    their run's broker window or on the broker; on broker: the queue's Redis list length,
    which a run's window (ZW_MAX_QUEUED_PER_RUN) keeps below ready; concurrency: the live
    workers' pool slots added up; wanted: see the formula under the table.
    """
    from scheduler.metrics import BrokerLengths, queue_loads
    from stores.metadata.store import MetadataStore

    settings = settings_of(ctx)
    metadata = MetadataStore(
        settings.resolved_metadata_url(), connect_args=settings.metadata_connect_args()
    )
    lengths = BrokerLengths(
        None if settings.is_embedded else settings.reveal_broker_url(),
        settings.broker_ssl_options(),
    )
    try:
        with metadata.read() as s:
            loads = queue_loads(
                s,
                now=time.time(),
                worker_ttl_s=settings.worker_ttl_s,
                queues=settings.queues,
                broker_lengths=lengths,
                default_concurrency=concurrency,
                max_workers=max_workers,
            )
    finally:
        lengths.close()
        metadata.dispose()
    if lengths.error:
        click.echo(f"warning: {lengths.error}", err=True)
    if as_json:
        for load in loads:
            click.echo(
                json.dumps(
                    {
                        "queue": load.queue,
                        "ready": load.ready,
                        "queued": load.queued,
                        "on_broker": load.on_broker,
                        "running": load.running,
                        "workers": load.workers,
                        "concurrency": load.slots,
                        "concurrency_per_worker": load.per_worker,
                        "wanted": load.wanted,
                    },
                    sort_keys=True,
                )
            )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "queue", "ready", "on broker", "running", "workers", "concurrency", "wanted", box=None
    )
    for load in loads:
        table.add_row(
            load.queue,
            str(load.ready),
            "-" if load.on_broker is None else str(load.on_broker),
            str(load.running),
            str(load.workers),
            str(load.slots),
            str(load.wanted),
        )
    console = Console(width=120)
    console.print(table)
    bound = "" if max_workers is None else f" (--max-workers {max_workers})"
    console.print(
        f"{FORMULA}{bound}; concurrency per worker: the live workers' mean, else "
        f"--concurrency {concurrency}",
        highlight=False,
        soft_wrap=True,
    )
