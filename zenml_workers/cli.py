"""``zw``: run workers, the scheduler and Flower; inspect runs, logs and cache decisions."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from zenml_workers.errors import ZenMLWorkersError


def _settings(ctx: click.Context) -> Any:
    from zenml_workers.settings import load_settings

    return load_settings(ctx.obj.get("stack_file"))


def _when(ts: float | None) -> str:
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


@cli.command()
@click.option(
    "--queues", "-Q", default="cpu", show_default=True, help="Comma-separated queues to consume."
)
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=None,
    help="Worker processes (gpu: one solo worker per GPU, each with its own CUDA_VISIBLE_DEVICES).",
)
@click.option("--pool", "-P", default=None, help="Celery pool (default: prefork; solo for gpu).")
@click.option("--hostname", "-n", default=None, help="Worker node name (default: celery's).")
@click.option("--skip-gpu-check", is_flag=True, help="Consume the gpu queue without a visible GPU.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.pass_context
def worker(
    ctx: click.Context,
    queues: str,
    concurrency: int | None,
    pool: str | None,
    hostname: str | None,
    skip_gpu_check: bool,
    loglevel: str,
) -> None:
    """Start a Celery worker on the configured broker."""
    settings = _settings(ctx)
    if settings.is_embedded:
        raise click.UsageError(
            "no broker configured; set ZW_BROKER_URL (e.g. redis://localhost:6379/0)"
        )
    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in settings.queues]
    if unknown:
        raise click.UsageError(
            f"queue(s) {', '.join(unknown)} are not configured (known: {', '.join(settings.queues)}); "
            "fix --queues or add them to ZW_QUEUES"
        )
    from zenml_workers.worker.signing import require_key

    require_key(settings, "worker")
    if skip_gpu_check:
        os.environ["ZW_SKIP_GPU_CHECK"] = "1"
    gpu = "gpu" in names
    if gpu:
        from zenml_workers.worker.tasks import check_gpu

        check_gpu()
    if gpu and (pool or "solo") == "solo" and concurrency and concurrency > 1:
        # One solo worker process per GPU, each seeing only its own device.
        _supervise_gpu_workers(ctx, queues, concurrency, hostname, loglevel)
        return
    from zenml_workers.worker.broker import check_broker_link
    from zenml_workers.worker.celery_app import create_app

    check_broker_link(settings.reveal_broker_url(), settings.broker_ssl_options())
    app = create_app(settings)
    # CUDA breaks in a child forked after it was initialised: one solo process per GPU.
    pool = pool or ("solo" if gpu else "prefork")
    argv = [
        "worker",
        "-Q",
        ",".join(names),
        "-P",
        pool,
        "-E",
        "-O",
        "fair",
        "--prefetch-multiplier",
        "1",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={loglevel}",
    ]
    if concurrency is not None and pool != "solo":
        argv += ["-c", str(concurrency)]
    if hostname:
        argv += ["-n", hostname]
    app.worker_main(argv)


def _supervise_gpu_workers(
    ctx: click.Context, queues: str, count: int, hostname: str | None, loglevel: str
) -> None:
    """Run ``count`` single-GPU workers (``CUDA_VISIBLE_DEVICES=i``) until they all stop."""
    import signal
    import socket
    import subprocess

    machine = socket.gethostname()
    name, _, host = (hostname or f"gpu@{machine}").replace("%h", machine).partition("@")
    procs = []
    for i in range(count):
        argv = [sys.executable, "-m", "zenml_workers.cli"]
        if ctx.obj.get("stack_file"):
            argv += ["--stack-file", ctx.obj["stack_file"]]
        argv += ["worker", "--queues", queues, "--concurrency", "1", "--pool", "solo"]
        argv += ["--hostname", f"{name}{i}@{host or machine}", "--loglevel", loglevel]
        procs.append(subprocess.Popen(argv, env=dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))))

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(max(codes))


@cli.command()
@click.option(
    "--interval",
    type=float,
    default=2.0,
    show_default=True,
    envvar="ZW_SCHEDULER_INTERVAL_S",
    help="Seconds between recovery passes (ZW_SCHEDULER_INTERVAL_S).",
)
@click.option("--once", is_flag=True, help="Run one recovery pass and exit.")
@click.pass_context
def scheduler(ctx: click.Context, interval: float, once: bool) -> None:
    """Run the scheduler service: recover lost steps, flag runs waiting on dead queues."""
    import logging

    from scheduler.recovery import RecoveryPolicy
    from scheduler.service import BrokerWatch, SchedulerService
    from stores.metadata.store import MetadataStore
    from zenml_workers.worker.celery_app import create_app, send_or_mark_unsent

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _settings(ctx)
    if settings.is_embedded:
        raise click.UsageError("the scheduler serves a cluster; set ZW_BROKER_URL")
    from zenml_workers.worker.signing import require_key

    require_key(settings, "scheduler")
    app = create_app(settings)
    metadata = MetadataStore(
        settings.resolved_metadata_url(), connect_args=settings.metadata_connect_args()
    )
    service = SchedulerService(
        metadata,
        lambda queued: send_or_mark_unsent(app, metadata, queued),
        policy=RecoveryPolicy(
            settings.requeue_queued_after_s,
            settings.max_queued_per_run,
            settings.lease_policy(),
            broker_check_after_s=settings.broker_check_after_s,
            broker_check_every_s=min(15.0, settings.broker_check_after_s / 2),
        ),
        interval_s=interval,
        broker=BrokerWatch(settings.reveal_broker_url(), settings.broker_ssl_options()),
    )
    if once:
        click.echo(f"sent {len(service.run_once())} step task(s)")
        return
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        service.stop()


#: Addresses ``zw flower --unauthenticated`` may listen on: this machine only.
_LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "localhost", "::1"})


def _pop_flower_option(args: Sequence[str], name: str) -> tuple[list[str], list[str]]:
    """Split Flower option ``name`` (e.g. ``basic_auth``) out of ``args``.

    Flower parses its options with tornado, which accepts ``--basic-auth=v``,
    ``--basic_auth=v`` and single dashes alike. The two-token form ``--basic-auth v`` is
    taken too. Returns the remaining arguments and the values found, in order.
    """
    wanted = name.replace("_", "-")
    rest: list[str] = []
    values: list[str] = []
    it = iter(args)
    for arg in it:
        key, equals, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or key.replace("_", "-") != wanted:
            rest.append(arg)
        elif equals:
            values.append(value)
        else:
            values.append(next(it, ""))
    return rest, values


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option(
    "--basic-auth",
    envvar="FLOWER_BASIC_AUTH",
    default=None,
    metavar="USER:PASSWORD[,...]",
    help="Log-in for the UI and the API (FLOWER_BASIC_AUTH, which keeps it out of shell history).",
)
@click.option(
    "--unauthenticated",
    is_flag=True,
    help="Serve without a log-in, on 127.0.0.1 or localhost only (local experiments).",
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def flower(
    ctx: click.Context,
    port: int,
    address: str,
    basic_auth: str | None,
    unauthenticated: bool,
    flower_args: tuple[str, ...],
) -> None:
    """Start Flower on the configured broker, behind a log-in (extra arguments go to flower).

    The broker URL and the log-in reach Flower through its environment (CELERY_BROKER_URL,
    FLOWER_BASIC_AUTH), not its command line, which any local user can read with `ps`.
    Flower's own OAuth (FLOWER_AUTH with FLOWER_AUTH_PROVIDER) counts as a log-in too.
    """
    settings = _settings(ctx)
    if settings.is_embedded:
        raise click.UsageError("Flower watches a broker; set ZW_BROKER_URL")
    args, passed = _pop_flower_option(flower_args, "basic_auth")
    basic_auth = ",".join(v for v in (basic_auth, *passed) if v) or None
    args, addresses = _pop_flower_option(args, "address")
    address = addresses[-1] if addresses else address
    oauth = bool(os.environ.get("FLOWER_AUTH")) or any(
        a.lstrip("-").partition("=")[0] == "auth" for a in args if a.startswith("-")
    )
    if unauthenticated and (basic_auth or oauth):
        raise click.UsageError(
            "--unauthenticated contradicts the log-in given (--basic-auth, FLOWER_BASIC_AUTH or "
            "FLOWER_AUTH); drop one of them"
        )
    if unauthenticated and address not in _LOOPBACK_ADDRESSES:
        raise click.UsageError(
            f"--unauthenticated serves Flower without a log-in, so it listens only on 127.0.0.1 "
            f"or localhost, not {address}; use --basic-auth USER:PASSWORD to listen there"
        )
    if not (unauthenticated or basic_auth or oauth):
        raise click.UsageError(
            "Flower would let anyone who reaches it see and control the workers; set "
            "FLOWER_BASIC_AUTH=user:password (or pass --basic-auth USER:PASSWORD), or pass "
            "--unauthenticated for a local experiment on 127.0.0.1"
        )
    if basic_auth and not all(
        user and password
        for user, _, password in (entry.partition(":") for entry in basic_auth.split(","))
    ):
        # The value is a password: say what is wrong with it, never echo it.
        raise click.UsageError(
            "--basic-auth / FLOWER_BASIC_AUTH must be USER:PASSWORD (several separated by "
            "commas), each with a non-empty user and password"
        )
    broker_url = settings.reveal_broker_url()
    # Celery reads CELERY_BROKER_URL over any configured broker (what `celery --broker` sets),
    # and ZW_BROKER_URL builds the same app in the child: nothing secret goes in argv.
    env = dict(os.environ, CELERY_BROKER_URL=broker_url, ZW_BROKER_URL=broker_url)
    if ctx.obj.get("stack_file"):
        env["ZW_STACK_FILE"] = str(ctx.obj["stack_file"])
    if basic_auth:
        env["FLOWER_BASIC_AUTH"] = basic_auth
    # exec keeps the PID and replaces the command line, so `zw`'s own argv is gone too.
    os.execvpe(
        sys.executable,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "zenml_workers.worker",
            "flower",
            f"--port={port}",
            f"--address={address}",
            *args,
        ],
        env,
    )


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
    for run in Client(_settings(ctx)).list_runs(pipeline=pipeline, limit=limit):
        cached = sum(1 for s in run.steps.values() if s.is_cached)
        duration = f"{run.duration_s:.2f}s" if run.duration_s is not None else "-"
        table.add_row(
            run.id[:8],
            run.pipeline,
            run.status,
            str(len(run.steps)),
            str(cached),
            _when(run.created_at),
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

    stack = get_stack(_settings(ctx))
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

    click.echo(Client(_settings(ctx)).logs(run_id, step), nl=False)


@cli.command()
@click.argument("run_id")
@click.argument("step")
@click.pass_context
def explain(ctx: click.Context, run_id: str, step: str) -> None:
    """Say why a step was, or was not, a cache hit."""
    from zenml_workers.sdk.client import Client

    for reason in Client(_settings(ctx)).explain_cache(run_id, step):
        click.echo(f"- {reason}")


@cli.command()
@click.argument("run_id")
@click.pass_context
def cancel(ctx: click.Context, run_id: str) -> None:
    """Cancel a run: revoke queued steps and stop running ones."""
    from zenml_workers.sdk.runner import RunHandle
    from zenml_workers.sdk.stack import get_stack

    stack = get_stack(_settings(ctx))
    from zenml_workers.sdk.client import Client

    run = Client(stack.settings).get_run(run_id)
    RunHandle(run.id, stack).cancel()
    click.echo(f"cancelled run {run.id}")


@cli.command("dead-letters")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Records to list."
)
@click.option("--clear", is_flag=True, help="Empty the list after listing it.")
@click.pass_context
def dead_letters(ctx: click.Context, limit: int, clear: bool) -> None:
    """List the messages workers dropped as unreadable, newest first."""
    from zenml_workers.worker.broker import DEAD_LETTER_KEY, DeadLetterList

    settings = _settings(ctx)
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
            click.echo(f"{_when(letter.at)}  {letter.queue}  {letter.reason}  {letter.raw[:80]!r}")
        if clear:
            click.echo(f"cleared {dead.clear()} record(s) from {DEAD_LETTER_KEY}")
    finally:
        dead.client.close()


@cli.command()
@click.pass_context
def stack(ctx: click.Context) -> None:
    """Show the active stack (credentials hidden)."""
    for key, value in _settings(ctx).describe().items():
        click.echo(f"{key}: {value}")


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


if __name__ == "__main__":
    main()
