"""``zw usage``: CPU- and GPU-seconds spent, and saved by cache hits, per user, pipeline or run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from zenml_workers.cli.base import cli, settings_of, when

if TYPE_CHECKING:
    from zenml_workers.sdk.resources import UsageRow

#: ``zw usage`` lines stay within this many columns.
WIDTH = 100
_KEY_W = 20
_NUMBERS = ("cpu_s", "gpu_s", "saved_cpu_s", "saved_gpu_s")
_HEADERS = ("cpu-s", "gpu-s", "saved cpu-s", "saved gpu-s")


def seconds_text(value: float) -> str:
    """How ``zw usage`` and ``zw show`` print a number of seconds: milliseconds, until the
    number is too long for its column."""
    return f"{value:.3f}" if value < 1e8 else f"{value:.0f}"


def _key_text(row: UsageRow, by: str) -> str:
    key = f"{row.key[:8]} {row.pipeline}" if by == "run" else row.key
    key = key or "(none)"
    return key if len(key) <= _KEY_W else key[: _KEY_W - 3] + "..."


def _line(key: str, runs: str, steps: str, cached: str, numbers: Sequence[str]) -> str:
    return f"{key:<{_KEY_W}} {runs:>5} {steps:>6} {cached:>6} " + " ".join(
        f"{n:>12}" for n in numbers
    )


def usage_lines(rows: Sequence[UsageRow], *, by: str, since: str, start: float) -> list[str]:
    """The report ``zw usage`` prints: a title, a header, one line per group and a total."""
    title = f"usage since {when(start)} UTC ({since}), by {by}"
    if not rows:
        return [title, "no step ran in this period"]
    lines = [title, _line(by, "runs", "steps", "cached", _HEADERS)]
    for r in rows:
        lines.append(
            _line(
                _key_text(r, by),
                str(r.runs),
                str(r.steps),
                str(r.cached_steps),
                [seconds_text(getattr(r, n)) for n in _NUMBERS],
            )
        )
    from stores.metadata.usage import seconds

    lines.append(
        _line(
            "total",
            str(sum(r.runs for r in rows)),
            str(sum(r.steps for r in rows)),
            str(sum(r.cached_steps for r in rows)),
            [seconds_text(seconds(sum(getattr(r, n) for r in rows))) for n in _NUMBERS],
        )
    )
    return lines


@cli.command()
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="Period back from now: a number and a unit (s, m, h, d, w), e.g. 30m, 12h, 7d.",
)
@click.option(
    "--by",
    type=click.Choice(["user", "pipeline", "run"]),
    default="user",
    show_default=True,
    help="Group the sums by the runs' user, pipeline or run.",
)
@click.pass_context
def usage(ctx: click.Context, since: str, by: str) -> None:
    """CPU- and GPU-seconds steps spent over a period, and what cache hits saved.

    Failed attempts count. A cache hit is credited with its original's cost as saved, to
    the run (and user) that reused it.
    """
    from stores.periods import parse_period
    from zenml_workers.sdk.client import Client

    now = time.time()
    try:
        start = now - parse_period(since)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from e
    rows = Client(settings_of(ctx)).usage(since=since, by=by, now=now)
    for line in usage_lines(rows, by=by, since=since, start=start):
        click.echo(line)
