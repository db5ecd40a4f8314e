"""``zw worker``, ``zw scheduler`` and ``zw flower``: the processes of a cluster."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from zenml_workers.cli.base import cli, settings_of


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
    settings = settings_of(ctx)
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
    if pool == "solo":
        # A solo worker runs one step at a time; without -c its banner (and its reported
        # slots) would say Celery's default, the number of CPUs.
        argv += ["-c", "1"]
    elif concurrency is not None:
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
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    envvar="ZW_METRICS_PORT",
    help="Serve Prometheus metrics (queue demand, wanted workers, run and step totals, "
    "recovery events) on this port at /metrics (ZW_METRICS_PORT); off by default.",
)
@click.option(
    "--metrics-address",
    default="127.0.0.1",
    show_default=True,
    envvar="ZW_METRICS_ADDRESS",
    help="Address the metrics endpoint listens on (ZW_METRICS_ADDRESS); 0.0.0.0 for a "
    "Prometheus on another machine.",
)
@click.pass_context
def scheduler(
    ctx: click.Context,
    interval: float,
    once: bool,
    metrics_port: int | None,
    metrics_address: str,
) -> None:
    """Run the scheduler service: recover lost steps, flag runs waiting on dead queues."""
    import logging

    from scheduler.recovery import RecoveryPolicy
    from scheduler.service import BrokerWatch, SchedulerService
    from stores.metadata.store import MetadataStore
    from zenml_workers.worker.celery_app import create_app, send_or_mark_unsent

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_of(ctx)
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
    if metrics_port is not None:
        _serve_scheduler_metrics(settings, metadata, service, metrics_port, metrics_address)
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        service.stop()


def _serve_scheduler_metrics(
    settings: Any, metadata: Any, service: Any, port: int, address: str
) -> None:
    """Start the scheduler's Prometheus endpoint, or exit with the sentence naming the port."""
    import logging
    import time

    from scheduler.metrics import BrokerLengths, SchedulerCollector, serve_metrics

    collector = SchedulerCollector(
        metadata,
        queues=settings.queues,
        worker_ttl_s=settings.worker_ttl_s,
        broker_lengths=BrokerLengths(settings.reveal_broker_url(), settings.broker_ssl_options()),
        recovery=service.events,
        clock=time.time,
    )
    try:
        serve_metrics(collector, port=port, address=address)
    except OSError as e:
        raise click.UsageError(
            f"the scheduler cannot serve metrics on {address}:{port} ({e.strerror or e}); "
            "pick a free --metrics-port (ZW_METRICS_PORT) or stop what listens there"
        ) from e
    logging.getLogger("zenml_workers.scheduler").info(
        "metrics on http://%s:%d/metrics", address, port
    )


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
    settings = settings_of(ctx)
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
