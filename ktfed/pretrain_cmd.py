"""`ktfed pretrain --config FILE.toml [--out DIR]`: pretrain the VLN backbone the coordinator hosts.

Writes DIR/backbone.safetensors, DIR/backbone.card.json (config, data, steps, losses, metrics,
SHA-256) and DIR/loss.png. The TOML file has two tables, both optional:

    [model]                      # kt_core.vln.backbone.VLNConfig fields except vocab_size
    d_model = 64
    n_cross_layers = 2

    [pretrain]                   # kt_core.vln.pretrain.PretrainSettings fields
    levels = ["BabyAI-GoToObj-v0", "BabyAI-GoToLocal-v0"]
    episodes_per_level = 400
    steps = 1500
    cache_dir = "~/.cache/ktfed/babyai"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_pretrain(args) -> int:
    import dataclasses

    import torch

    from kt_core.config_file import ConfigError
    from kt_core.vln.pretrain import load_config, run_pretraining

    try:
        model_cfg, settings = load_config(Path(args.config))
    except ConfigError as err:
        print(f"error: invalid config: {err}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    if settings.cache_dir:
        settings = dataclasses.replace(settings, cache_dir=str(Path(settings.cache_dir).expanduser()))
    out = Path(args.out)
    if (out / "backbone.safetensors").exists() and not args.force:
        print(f"error: {out / 'backbone.safetensors'} exists; give --force to replace it", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        result = run_pretraining(model_cfg, settings, out)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"error: pretraining failed: {err}", file=sys.stderr)
        return 1
    card = result.card
    m = result.metrics
    print(f"backbone written to {out / 'backbone.safetensors'} ({card['parameters']:,} parameters, "
          f"sha256 {card['checkpoint']['sha256']})")
    print(f"  {settings.steps} steps in {result.seconds:.0f} s ({result.samples_per_s:.0f} samples/s); final losses: "
          f"mlm {card['losses']['final_mlm']:.3f}, action {card['losses']['final_action']:.3f}")
    if m:
        line = (f"  unseen seeds: action accuracy {m['val_action_accuracy']:.3f}, "
                f"masked-word accuracy {m['val_mlm_accuracy']:.3f}")
        if "success_rate" in m:
            line += f", success rate {m['success_rate']:.3f}, SPL {m['spl']:.3f} (mean over levels)"
        print(line)
    print(f"  model card {out / 'backbone.card.json'}, loss curve {out / 'loss.png'}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `pretrain` command to the `ktfed` sub-command parsers."""
    p = subparsers.add_parser("pretrain", help="pretrain the VLN backbone (PREVALENT-style, BabyAI demonstrations)",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML file with [model] and [pretrain] tables")
    p.add_argument("--out", default="backbone", help="output folder (default: ./backbone)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint in --out")
    p.set_defaults(func=cmd_pretrain)
    return p
