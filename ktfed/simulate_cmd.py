"""`ktfed simulate`: N virtual participants in one process, on the product's own code (ktfed/simulate.py).

    ktfed simulate --participants N --config run.toml [--rounds R] [--out DIR] [--json]

Standard library only at import: the CLI builds its parser on every invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="N virtual participants in one process, without sockets (same agent, aggregation, "
                         "SecAgg and DP code as a real federation)")
    p.add_argument("--participants", type=int, required=True, help="number of virtual sites")
    p.add_argument("--config", required=True, help="run config (TOML); its federation.sites are used when it lists N of them, else N virtual "
                        "sites site-000 ... replace them (said at start)")
    p.add_argument("--rounds", type=int, help="override federation.rounds")
    p.add_argument("--out", default="ktfed-simulation",
                   help="folder for the coordinator's state, the sites' state and simulation.json (replaced)")
    p.add_argument("--data-root", help="folder of the data set files (default: the system's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 matches `participant run`)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-file", help="write logs here instead of stderr")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    import torch

    from kt_core.config import ConfigError, load_file
    from ktfed.logs import setup_logging
    from ktfed.simulate import simulate

    setup_logging(args.log_level, args.log_file, "text")
    if args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    if args.rounds is not None and args.rounds < 1:
        print("error: --rounds must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out).absolute()
    try:
        config = load_file(Path(args.config), os.environ)
        listed = config.federation.sites
        if listed and len(listed) != args.participants:
            print(f"note: {args.config} lists {len(listed)} site(s) in federation.sites; simulating "
                  f"{args.participants} virtual sites site-000 ... instead (the data is partitioned over them)",
                  file=sys.stderr)
        if not args.json:
            print(f"ktfed simulate: {args.participants} virtual participants in one process; state in {out}")
            print(f"{'round':>5} {'sites':>5} {'mean acc':>9} {'time':>8}")
        result = simulate(config, args.participants, out, rounds=args.rounds,
                          data_root=Path(args.data_root) if args.data_root else None, timeout_s=args.timeout,
                          on_round=None if args.json else _print_round)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = summarize(result)
    (out / "simulation.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\nrun {result.run_id} finished: {result.rounds} rounds x {result.participants} virtual participants "
              f"in {result.rounds_wall_s:.2f} s of rounds ({result.wall_s:.2f} s in all): "
              f"{result.throughput:.1f} participant-rounds per second")
        print(f"global state: {out / summary['state_file']}; summary: {out / 'simulation.json'}")
    return 0


def _print_round(record) -> None:
    accs = [v for k, v in record.metrics.items() if k.endswith("/accuracy")]
    mean = f"{sum(accs) / len(accs):9.3f}" if accs else f"{'-':>9}"
    print(f"{record.round:>5} {len(record.contributors):>5} {mean} {record.seconds:>7.2f}s", flush=True)


def summarize(result) -> dict:
    status = result.status
    rounds = []
    for r in status.rounds:
        accs = [v for k, v in r.metrics.items() if k.endswith("/accuracy")]
        rounds.append({"round": r.round, "contributors": len(r.contributors), "dropped": list(r.dropped),
                       "seconds": r.seconds, "bytes_received": r.bytes_received,
                       "mean_accuracy": sum(accs) / len(accs) if accs else None,
                       "secagg": r.secagg})
    return {"run_id": result.run_id, "participants": result.participants, "rounds": result.rounds,
            "state": status.state, "global_state_digest": status.global_state_digest,
            "state_file": f"coordinator/runs/{result.run_id}/round-{result.rounds:05d}.safetensors",
            "wall_s": result.wall_s, "rounds_wall_s": result.rounds_wall_s,
            "participant_rounds_per_s": result.throughput, "exit_codes": result.exit_codes, "per_round": rounds}


if __name__ == "__main__":  # python -m ktfed.simulate_cmd ...: the same command without the rest of the CLI
    parser = argparse.ArgumentParser(prog="ktfed")
    register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
