"""python -m bench [overhead] [bytes] [waffle] [--quick] [--rounds N] ...  (or `python PATH/bench ...` from any folder)"""
from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python PATH/bench`: from any folder, the checkout's root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import BENCHMARKS  # noqa: E402 - after the path set-up above
from bench.common import RESULTS, Options, say, table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke-size run of each (tiny sizes, one seed; about a minute in all, see bench/README.md)")
    parser.add_argument("--rounds", type=int, help="rounds per run (overrides each benchmark's default)")
    parser.add_argument("--max-train", type=int, help="waffle: training samples before partitioning (0 = all)")
    parser.add_argument("--epochs", type=int, help="waffle: local epochs per round")
    parser.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "digits"],
                        help="waffle: data set (auto = fashion-mnist when installed)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    parser.add_argument("--grid", action="store_true", help="waffle: run the whole grid (bench/waffle_grid.py)")
    parser.add_argument("--keep", action="store_true", help="keep the federations' work folders and logs")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    opts = Options(quick=args.quick, rounds=args.rounds, max_train=args.max_train, dataset=args.dataset,
                   epochs=args.epochs, keep=args.keep, grid=args.grid, out=args.out)

    timings, failed = [], []
    started, cpu_start = time.monotonic(), cpu_seconds()
    # the host is shared (2 cores here): say how busy it was, since every time below depends on it
    say(f"python -m bench {' '.join(names)}{' --quick' if opts.quick else ''}: {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start")
    for name in names:
        t0, cpu0 = time.monotonic(), cpu_seconds()   # importing a benchmark's libraries is part of its cost
        module = importlib.import_module(f"bench.{name}")
        say(f"\n=== {name}{' (quick)' if opts.quick else ''}: {module.DESCRIPTION}")
        try:
            data = module.run(opts)
        except Exception as err:  # noqa: BLE001 - report and go on with the other benchmarks
            failed.append(name)
            say(f"[{name}] FAILED: {type(err).__name__}: {err}")
            timings.append([name, f"{time.monotonic() - t0:.1f}", f"{cpu_seconds() - cpu0:.1f}", "FAILED"])
            continue
        elapsed, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
        data = {"benchmark": name, "quick": opts.quick, "wall_s": elapsed, "cpu_s": cpu, "cpus": os.cpu_count(),
                "load_average_1min_at_end": os.getloadavg()[0], **data}
        path = write_json(opts.out, name, data)
        timings.append([name, f"{elapsed:.1f}", f"{cpu:.1f}", str(path)])
    say("\n" + table(["benchmark", "wall s", "cpu s", "results"], timings,
                     title=f"=== done in {time.monotonic() - started:.1f} s, {cpu_seconds() - cpu_start:.1f} CPU s "
                           f"(load average {os.getloadavg()[0]:.2f})"))
    return 1 if failed else 0


def cpu_seconds() -> float:
    """CPU time of this process and of the processes it started and waited for (coordinators,
    participants): on a shared host, what a benchmark costs whatever else the machine was doing."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    sys.exit(main())
