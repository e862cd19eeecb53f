"""`ktfed participant distill`: compress this site's teacher into a small local student.

    ktfed participant distill --config site.toml                      # MixKD/KD/no KD per [distill]
        (navigation: distill.teacher = the site's STATE/adapted-<run>.safetensors, its federated model)
    ktfed participant distill --config site.toml --finetune-teacher   # text: make the teacher first
    ktfed participant distill --config site.toml --nproc 2            # DDP, 2 processes here
    torchrun --nproc-per-node 4 -m ktfed participant distill --config site.toml

`register(participant_subparsers)` adds the command under `ktfed participant` (ktfed/cli.py).
Nothing is sent anywhere: the student, its report and its curves stay in distill.out_dir.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def register(participant_subparsers) -> argparse.ArgumentParser:
    p = participant_subparsers.add_parser(
        "distill", help="distill this site's teacher into a small local student (MixKD, KD or none)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="site config (TOML) with a [distill] section")
    p.add_argument("--finetune-teacher", action="store_true",
                   help="text task: fine-tune MiniLM on the site's data first and write it to distill.teacher")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override distill.device")
    p.add_argument("--nproc", type=int, help="DDP processes on this machine (default: distill.processes; "
                                             "ignored under torchrun, which sets WORLD_SIZE)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_distill)
    return p


def cmd_distill(args) -> int:
    import os

    import torch

    from kt_core.distill.bert import StudentTooLargeError
    from kt_core.distill.checkpoint import CheckpointError
    from kt_core.distill.config import load_site_config
    from kt_core.distill.ddp import DistContext, DistributedSetupError
    from kt_core.distill.device import DeviceError
    from kt_core.distill.loop import EmptyDatasetError
    from kt_core.config_file import ConfigError
    from kt_core.distill.text import TextDataError
    from participant.distiller import run_distill, run_local_processes

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))
    config_path = Path(args.config)
    try:
        cfg = load_site_config(config_path)
    except ConfigError as err:
        print(f"error: invalid config: {err}", file=sys.stderr)
        return 2
    if args.device:
        cfg = cfg.with_device(args.device)
    if args.finetune_teacher and cfg.task != "text":
        print("error: --finetune-teacher is for the text task; a navigation teacher is the site's federated "
              "model (STATE/adapted-<run>.safetensors, written when the run finishes)", file=sys.stderr)
        return 2
    nproc = args.nproc if args.nproc is not None else cfg.processes
    if nproc < 1:
        print(f"error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    try:
        DistContext.from_env()  # an incomplete torchrun environment fails here, naming the variable
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            report = run_local_processes(config_path, nproc, device=args.device, finetune_teacher=args.finetune_teacher)
        else:
            # a bar redrawn into a file or pipe is kilobytes of carriage returns: epochs are logged anyway
            report = run_distill(cfg, finetune_teacher=args.finetune_teacher,
                                 progress=not args.no_progress and sys.stderr.isatty())
    except (CheckpointError, StudentTooLargeError, DeviceError, EmptyDatasetError, TextDataError, ConfigError,
            DistributedSetupError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not report:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(summary(report))
    return 0


def summary(report: dict) -> str:
    t, s = report["teacher"], report["student"]
    metric = "accuracy" if report["task"] == "text" else "success_rate"
    lines = [
        f"{report['task']} student ({report['method']}): {s['parameters']:,} parameters vs the teacher's "
        f"{t['parameters']:,} ({report['compression']:.1f}x fewer)",
    ]
    if report["task"] == "nav":
        lines.append(f"  teacher: {t['site']}'s federated model, run {t['run_id']} after round {t['round']} (global "
                     f"state {t['global_state_digest'][:16]}...); backbone {t['backbone_parameters']:,} parameters, "
                     f"{report['compression_vs_backbone']:.1f}x the student's")
    lines += [
        f"  test {metric}: student {s['test'][metric]:.4f}, teacher {t['test'][metric]:.4f} "
        f"({100 * s['retained']:.1f}% retained)",
        f"  CPU latency (1 example): student {s['cpu_speed']['latency_ms']:.2f} ms, teacher "
        f"{t['cpu_speed']['latency_ms']:.2f} ms; throughput student {s['cpu_speed']['throughput_per_s']:.0f}/s, "
        f"teacher {t['cpu_speed']['throughput_per_s']:.0f}/s",
        f"  distillation: {report['history']['samples_per_s']:.0f} samples/s on {report['device']}"
        f" x{report['world_size']} process(es)"
        + (f", peak GPU memory {report['history']['max_memory_bytes'] / 2**20:.0f} MiB"
           if report['history'].get('max_memory_bytes') else ""),
    ]
    if report["task"] == "nav":
        lines.insert(3, f"  test SPL: student {s['test']['spl']:.4f}, teacher {t['test']['spl']:.4f} (rollouts on "
                        f"{report['data']['eval_episodes_per_level']} unseen seeds per level)")
    if report.get("epsilon"):
        lines.append(f"  DP-SGD: epsilon {report['epsilon']['epsilon']:.2f} at delta {report['epsilon']['delta']:.1e}")
    lines.append(f"  kept on this site: {s['path']} (sha256 {s['sha256'][:16]}...), {report['curves']}")
    return "\n".join(lines)
