"""``python -m bench``: run the benchmarks, write ``bench/results.json`` and print a table.

Every comparison is measured side by side in this run on this machine, except
the ZenML 0.98 figures, which are the published ones. Nothing here asserts on
time; a failing benchmark is reported and the others still run.

    python -m bench                  # everything (1 GiB through S3)
    python -m bench --quick          # 256 MiB through S3, fewer repeats
    python -m bench --only cluster   # one benchmark or group while developing
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.report import Result, machine_info, print_table, progress, write_json

BENCH_DIR = Path(__file__).resolve().parent
#: Benchmark names accepted by ``--only``, and the groups that expand to several of them.
NAMES = (
    "chain",
    "fan",
    "cached",
    "import",
    "s3",
    "raw",
    "cluster-chain",
    "fanout",
    "planning",
    "logs",
    "stop",
    "faults",
    "profile",
    "chaos",
)
#: What a plain ``python -m bench`` runs: everything but the traced-worker profile and the
#: five-minute chaos run.
DEFAULT = tuple(n for n in NAMES if n not in ("profile", "chaos"))
GROUPS = {
    "embedded": ("chain", "fan", "cached", "import"),
    "cluster": ("raw", "cluster-chain", "fanout"),
}
#: Cluster ratios need the raw numbers of the same run.
NEEDS = {"cluster-chain": ("raw",), "fanout": ("raw",), "profile": ("raw",)}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these (repeatable): {', '.join(NAMES + tuple(GROUPS))}",
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB through S3 and fewer repeats")
    parser.add_argument(
        "--s3-mib", type=int, default=None, help="array size for the S3 benchmark (MiB)"
    )
    parser.add_argument(
        "--no-postgres", action="store_true", help="use SQLite for the cluster and planning"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default bench/results.json; bench/results-partial.json with --only)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (logs, databases)"
    )
    parser.add_argument(
        "--chaos-s", type=float, default=300.0, help="length of the chaos run (seconds)"
    )
    args = parser.parse_args(argv)
    selected: list[str] = []
    for name in args.only or list(DEFAULT):
        if name in GROUPS:
            selected.extend(GROUPS[name])
        elif name in NAMES:
            selected.append(name)
        else:
            parser.error(
                f"unknown benchmark {name!r}; choose from {', '.join(NAMES + tuple(GROUPS))}"
            )
    for name in list(selected):
        selected = [*NEEDS.get(name, ()), *selected]
    args.selected = [n for n in NAMES if n in set(selected)]
    if args.out is None:
        args.out = BENCH_DIR / ("results-partial.json" if args.only else "results.json")
    return args


class Lab:
    """Shared state of one bench run: the temporary folder, PostgreSQL (started once), errors."""

    def __init__(self, workdir: Path, use_postgres: bool) -> None:
        self.workdir = workdir
        self.use_postgres = use_postgres
        self.results: list[Result] = []
        self.errors: dict[str, str] = {}
        self.notes: dict[str, Any] = {}
        self._postgres: Any = None
        self._postgres_failed = False

    def postgres(self) -> Any:
        """The bench's PostgreSQL server, started on first use; None when unavailable or disabled."""
        if not self.use_postgres or self._postgres_failed:
            return None
        if self._postgres is None:
            from bench.services import BenchServiceError, start_postgres

            started = time.perf_counter()
            try:
                self._postgres = start_postgres(timeout_s=30.0)
            except (BenchServiceError, OSError, KeyError, subprocess.SubprocessError) as e:
                self._postgres_failed = True
                self.notes["postgres"] = f"not used: {e}"
                progress(f"PostgreSQL unavailable, using SQLite instead ({e})")
                return None
            self.notes["postgres_start_s"] = time.perf_counter() - started
            progress(f"PostgreSQL up in {self.notes['postgres_start_s']:.1f} s")
        return self._postgres

    def metadata_url(self, name: str) -> tuple[str, str]:
        """A fresh metadata database: (URL, ``postgresql`` or ``sqlite``)."""
        pg = self.postgres()
        if pg is not None:
            return pg.create_database(name), "postgresql"
        return f"sqlite:///{self.workdir / name}.db", "sqlite"

    def run(self, name: str, fn: Callable[[], Result | list[Result]]) -> list[Result]:
        """Run one benchmark, keeping its results or its error."""
        progress(f"--- {name}")
        try:
            out = fn()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one broken benchmark must not hide the others' numbers
            self.errors[name] = "".join(traceback.format_exception(e))
            progress(f"{name} FAILED: {type(e).__name__}: {e}")
            return []
        results = out if isinstance(out, list) else [out]
        self.results.extend(results)
        return results

    def close(self) -> None:
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None


def _embedded(lab: Lab, selected: list[str], quick: bool) -> None:
    from bench import embedded
    from zenml_workers.sdk.stack import close_stacks

    settings = embedded.embedded_settings(lab.workdir / "embedded-home")
    seeds = embedded.Seeds()
    try:
        if "chain" in selected:
            lab.run(
                "chain", lambda: embedded.bench_chain(settings, seeds, repeats=5 if quick else 10)
            )
        if "fan" in selected:
            lab.run("fan", lambda: embedded.bench_fan(settings, seeds, repeats=3 if quick else 5))
        if "cached" in selected:
            lab.run(
                "cached", lambda: embedded.bench_cached(settings, seeds, repeats=5 if quick else 10)
            )
    finally:
        close_stacks()  # stops the local pool, so it does not compete with what follows
    if "import" in selected:
        lab.run("import", lambda: embedded.bench_import(repeats=3 if quick else 5))


def _planning(lab: Lab, quick: bool) -> None:
    from bench.planning import bench_planning

    repeats = 2 if quick else 3
    lab.run(
        "planning.sqlite",
        lambda: bench_planning(f"sqlite:///{lab.workdir / 'plan.db'}", "sqlite", repeats=repeats),
    )
    if lab.postgres() is not None:
        url, _ = lab.metadata_url("plan")
        lab.run("planning.postgresql", lambda: bench_planning(url, "postgresql", repeats=repeats))


def _cluster(lab: Lab, selected: list[str], quick: bool) -> None:
    from bench.cluster import (
        bench_cluster_chain,
        bench_cluster_fanout,
        bench_raw_roundtrip,
        bench_raw_throughput,
        cluster,
    )
    from bench.embedded import Seeds

    url, kind = lab.metadata_url("cluster")
    seeds = Seeds(start=5_000)
    with cluster(lab.workdir / "cluster", url, kind) as c:
        rtt = lab.run("raw.roundtrip", lambda: bench_raw_roundtrip(c, calls=100 if quick else 200))
        raw = lab.run("raw.throughput", lambda: bench_raw_throughput(c, repeats=2 if quick else 3))
        if "cluster-chain" in selected and rtt:
            lab.run(
                "cluster-chain",
                lambda: bench_cluster_chain(c, seeds, rtt[0].value, repeats=5 if quick else 10),
            )
        if "fanout" in selected and raw:
            lab.run(
                "fanout",
                lambda: bench_cluster_fanout(c, seeds, raw[0].value, repeats=1 if quick else 2),
            )
    if "cluster-chain" in selected and kind != "sqlite":
        # The same chain with the metadata store in a SQLite file on the workers' host: it
        # shows how much of the per-step overhead is PostgreSQL round trips.
        sqlite_url = f"sqlite:///{lab.workdir / 'cluster-sqlite.db'}"
        with cluster(lab.workdir / "cluster-sqlite", sqlite_url, "sqlite") as c:
            rtt_lite = lab.run(
                "raw.roundtrip.sqlite-cluster",
                lambda: bench_raw_roundtrip(
                    c, calls=100 if quick else 200, name="cluster.raw_roundtrip_sqlite_cluster"
                ),
            )
            if rtt_lite:
                lab.run(
                    "cluster-chain-sqlite",
                    lambda: bench_cluster_chain(
                        c,
                        seeds,
                        rtt_lite[0].value,
                        repeats=5 if quick else 10,
                        name="cluster.chain10_per_step_sqlite",
                    ),
                )
    if "profile" in selected:
        from bench.profile import bench_profile

        profile_url, _ = lab.metadata_url("profile")
        rtt_s = rtt[0].value if rtt else None
        lab.run(
            "profile",
            lambda: bench_profile(
                lab.workdir, profile_url, kind, rtt_s, repeats=5 if quick else 10
            ),
        )


def _stop(lab: Lab, workdir: Path, quick: bool) -> None:
    from bench import stop

    repeats = 2 if quick else 3
    try:
        with stop.stop_cluster(workdir) as c:
            lab.run("stop.host", lambda: stop.bench_host_overhead(c, repeats=2 * repeats))
            lab.run(
                "stop.latency",
                lambda: stop.bench_stop_latency(c, workdir / "stop-latency", repeats),
            )
            lab.run(
                "stop.hand_back",
                lambda: stop.bench_hand_back(c, workdir / "stop-hand-back", repeats),
            )
    except Exception as e:  # the cluster did not start: the other benchmarks still run
        lab.errors["stop"] = "".join(traceback.format_exception(e))
        progress(f"stop FAILED: {type(e).__name__}: {e}")


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="zw-bench-"))
    try:
        yield path
    finally:
        if keep:
            progress(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    # SystemExit unwinds through the finally blocks, which stop every service started.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.perf_counter()
    s3_mib = args.s3_mib or (256 if args.quick else 1024)
    progress(f"benchmarks: {', '.join(args.selected)}{' (quick)' if args.quick else ''}")
    info = machine_info()
    with _workdir(args.keep) as workdir:
        lab = Lab(workdir, use_postgres=not args.no_postgres)
        try:
            if set(args.selected) & set(GROUPS["embedded"]):
                _embedded(lab, args.selected, args.quick)
            if "planning" in args.selected:
                _planning(lab, args.quick)
            if "logs" in args.selected:
                from bench.logs import bench_logs

                lab.run("logs", lambda: bench_logs(workdir, quick=args.quick))
            if set(args.selected) & set(GROUPS["cluster"]):
                _cluster(lab, args.selected, args.quick)
            if "s3" in args.selected:
                from bench.artifacts import bench_s3

                lab.run("s3", lambda: bench_s3(workdir, s3_mib * 1024 * 1024))
            if "stop" in args.selected:
                _stop(lab, workdir, args.quick)
            if "faults" in args.selected:
                from bench.faults import bench_faults

                lab.run(
                    "faults",
                    lambda: bench_faults(
                        workdir, profiles=("default",) if args.quick else ("default", "short")
                    ),
                )
            if "chaos" in args.selected:
                from bench.chaos import run_chaos

                lab.run("chaos", lambda: run_chaos(workdir / "chaos", duration_s=args.chaos_s))
        finally:
            lab.close()
    total = time.perf_counter() - started
    run_info = {
        "selected": args.selected,
        "quick": args.quick,
        "s3_size_mib": s3_mib,
        "total_s": total,
        "notes": lab.notes,
        "errors": lab.errors,
    }
    write_json(args.out, lab.results, info, run_info)
    print()
    print_table(lab.results, info, total)
    progress(f"wrote {args.out} in {total:.0f} s total")
    for name, error in lab.errors.items():
        print(f"\n{name} failed:\n{error}", file=sys.stderr)
    return 1 if lab.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
