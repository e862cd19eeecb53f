"""The PREVALENT claim on BabyAI: a pretrained backbone fine-tuned on a level it never saw beats the
same architecture trained from scratch with the same fine-tuning budget, on unseen seeds.

The backbone is the demo's (ktfed.demo_backbone: pretrained once with attended MLM + action
prediction on bot demonstrations of twelve going-to and door-opening levels, no picking up, with a
memory of its last steps; cached). Target: BabyAI-PickupDist-v0 ("pick up the red key" among
distractors), which needs an action the pretraining data never shows. Every method gets the same
target demonstrations (site 0's seed block: 50, then 200 episodes), the same number of optimizer
steps and batch size, and is evaluated by rollouts on the same unseen seeds (the evaluation block):

  zero-shot     the pretrained backbone as is
  pretrained    the pretrained backbone, every weight fine-tuned
  +waffle       the pretrained backbone frozen, WAFFLe adapters on its cross-modal layers + action head
  scratch       the same architecture from a random initialization, every weight trained

"pretrained" and "scratch" each choose their learning rate among LRS on the validation seeds, at
each number of demonstrations (one training seed; a rate chosen at 50 need not suit 200: the
pretrained model fine-tuned at 50's rate scored lower at 200 than at 50); the evaluation seeds only
report. Each trained method then
runs from TRAIN_SEEDS (batch order; scratch's initialization too); the table gives mean ± s.e.
over them, and pretrained − scratch paired per seed.

Also reported: pretraining throughput (samples/s) of this architecture on CPU (one thread), and
on a GPU when one is here.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import numpy as np
import torch

from bench.common import Options, pyplot, say, table
from kt_core.train import TrainConfig
from kt_core.vln.adapt import AdapterConfig, adapt_backbone
from kt_core.vln.babyai import default_cache_dir, get_demos
from kt_core.vln.backbone import VLNBackbone, VLNConfig, count_parameters
from kt_core.vln.checkpoint import LoadedBackbone, load_backbone
from kt_core.vln.finetune import encode_demos, eval_seeds, evaluate, evaluate_rollouts, site_data, train_local
from kt_core.vln.pretrain import DEFAULT_LEVELS, load_level_demos, pretraining_throughput
from kt_core.vln.tokenizer import Tokenizer

NAME = "vln"
DESCRIPTION = "pretrained VLN backbone vs the same architecture from scratch, fine-tuned on a held-out BabyAI level"
TARGET = "BabyAI-PickupDist-v0"
LRS = (5e-4, 1e-3, 2e-3)
ADAPTER_LR = 5e-3
DEMONSTRATIONS = (50, 200)
TRAIN_SEEDS = (10, 11, 12, 13, 14)
VALIDATION_ROLLOUTS = 50
# the fine-tuning recipe, the same for every method but the learning rate (the adapters get a larger
# one: they start from zero deltas and carry fewer parameters, as is usual for LoRA-style tuning)
FINETUNE = dict(batch_size=32, optimizer="adam", max_grad_norm=1.0)


def settings(opts: Options) -> dict:
    """--quick is a smoke test of the whole pipeline on a small untrained model: its verdict means
    nothing. The claim is measured by the full run."""
    if opts.quick:
        return {"demonstrations": (4,), "finetune_steps": 3, "eval_episodes": 2, "seeds": (0,),
                "validation_rollouts": 2}
    return {"demonstrations": DEMONSTRATIONS, "finetune_steps": opts.rounds or 300, "eval_episodes": 100,
            "seeds": TRAIN_SEEDS, "validation_rollouts": VALIDATION_ROLLOUTS}


def _backbone(opts: Options) -> LoadedBackbone:
    if opts.quick:
        tok = Tokenizer()
        cfg = VLNConfig(d_model=32, n_heads=4, n_lang_layers=1, n_vision_layers=0, n_cross_layers=1,
                        vocab_size=len(tok), memory=2)
        return LoadedBackbone(VLNBackbone(cfg), tok, cfg, "", None)
    from ktfed.demo_backbone import demo_backbone

    return load_backbone(demo_backbone())


def _finetune(backbone, tok, start: str, lr: float | None, train, steps: int, seed: int):
    model = _model_for(start, backbone, seed)
    if lr is not None:
        train_local(model, train, TrainConfig(epochs=10**6, max_steps=steps, kl_weight=1.0, lr=lr, seed=seed,
                                              **FINETUNE))
    return model


def _choose_lrs(backbone, tok, cfg: dict, cache) -> dict:
    """Each of pretrained / scratch: its best learning rate on the validation seeds, per number of
    demonstrations."""
    chosen, grid = {}, []
    for n_demos in cfg["demonstrations"]:
        train = encode_demos(site_data(0, [TARGET], n_demos, cache), tok, backbone.cfg.max_len, backbone.cfg.memory)
        for start in ("pretrained", "scratch"):
            scores = {}
            for lr in LRS:
                model = _finetune(backbone, tok, start, lr, train, cfg["finetune_steps"], seed=0)
                scores[lr] = evaluate_rollouts(model, tok, TARGET, cfg["validation_rollouts"], cache,
                                               validation=True)["success_rate"]
                grid.append({"demonstrations": n_demos, "start": start, "lr": lr, "validation_success_rate": scores[lr]})
                say(f"  [validation] {n_demos} demonstrations, {start}, lr {lr:g}: SR {scores[lr]:.3f}")
            chosen[(n_demos, start)] = max(scores, key=scores.get)
    return {"chosen": chosen, "grid": grid}


def run(opts: Options) -> dict:
    torch.set_num_threads(1)
    cfg = settings(opts)
    cache = default_cache_dir()
    loaded = _backbone(opts)
    backbone, tok = loaded.model, loaded.tokenizer
    say(f"[vln] backbone {loaded.path}: {count_parameters(backbone):,} parameters, memory {backbone.cfg.memory}")
    lrs = _choose_lrs(backbone, tok, cfg, cache)
    test_seeds = eval_seeds(cfg["eval_episodes"])
    results = {}
    for n_demos in cfg["demonstrations"]:
        demos = site_data(0, [TARGET], n_demos, cache)
        train = encode_demos(demos, tok, backbone.cfg.max_len, backbone.cfg.memory)
        test = encode_demos(get_demos(TARGET, test_seeds, cache), tok, backbone.cfg.max_len, backbone.cfg.memory)
        say(f"[vln] {TARGET}: {demos.num_episodes} episodes ({len(train)} samples), {cfg['finetune_steps']} steps "
            f"of batch {FINETUNE['batch_size']}; {cfg['eval_episodes']} unseen seeds")
        per = {}
        methods = (("zero-shot", "pretrained", None), ("pretrained", "pretrained", lrs["chosen"][n_demos, "pretrained"]),
                   ("pretrained+waffle", "adapters", ADAPTER_LR), ("scratch", "scratch", lrs["chosen"][n_demos, "scratch"]))
        for method, start, lr in methods:
            runs = []
            for seed in (cfg["seeds"][:1] if lr is None else cfg["seeds"]):
                t0 = time.monotonic()
                model = _finetune(backbone, tok, start, lr, train, cfg["finetune_steps"], seed)
                roll = evaluate_rollouts(model, tok, TARGET, cfg["eval_episodes"], cache)
                runs.append({**roll, "seed": seed, "action_accuracy": evaluate(model, test)["accuracy"],
                             "seconds": time.monotonic() - t0})
            per[method] = {"lr": lr, "runs": runs, "trainable_parameters": count_parameters(model, True),
                           "success_rate": _mean_se([r["success_rate"] for r in runs]),
                           "spl": _mean_se([r["spl"] for r in runs])}
        paired = [p["success_rate"] - s["success_rate"]
                  for p, s in zip(per["pretrained"]["runs"], per["scratch"]["runs"])]
        results[n_demos] = {"methods": per, "pretrained_minus_scratch": _mean_se(paired)}
        _table(n_demos, per, results[n_demos]["pretrained_minus_scratch"], cfg)
    holds = {n: r["pretrained_minus_scratch"][0] > 0 for n, r in results.items()}
    verdict = "not measured by --quick" if opts.quick else (
        "holds" if all(holds.values()) else "DOES NOT hold at " + ", ".join(f"{n}" for n, h in holds.items() if not h))
    say(f"PREVALENT claim (pretrained + fine-tuning beats scratch, same budget, at "
        f"{' and '.join(map(str, cfg['demonstrations']))} demonstrations): {verdict}")
    throughput = _throughput(backbone.cfg, tok, cache, quick=opts.quick)
    out = {"settings": {"model": backbone.cfg.to_dict(), "backbone": str(loaded.path), "target": TARGET,
                        "finetune_steps": cfg["finetune_steps"], "finetune": FINETUNE, "lrs": list(LRS),
                        "adapter_lr": ADAPTER_LR, "eval_episodes": cfg["eval_episodes"], "seeds": list(cfg["seeds"])},
           "lr_selection": {"chosen": {f"{n} {start}": lr for (n, start), lr in lrs["chosen"].items()},
                            "grid": lrs["grid"]}, "results": {str(k): v for k, v in results.items()}, "throughput": throughput,
           "claim_holds": None if opts.quick else all(holds.values())}
    _plot(out, opts)
    return out


def _mean_se(values) -> tuple[float, float]:
    if len(values) < 2:
        return float(values[0]), 0.0
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def _table(n_demos: int, per: dict, diff, cfg: dict) -> None:
    rows = [[m, "-" if p["lr"] is None else f"{p['lr']:g}", f"{p['success_rate'][0]:.3f} ± {p['success_rate'][1]:.3f}",
             f"{p['spl'][0]:.3f} ± {p['spl'][1]:.3f}", f"{np.mean([r['action_accuracy'] for r in p['runs']]):.3f}",
             f"{p['trainable_parameters']:,}", str(len(p["runs"]))] for m, p in per.items()]
    say(table(["method", "lr", "SR ± s.e.", "SPL ± s.e.", "action acc", "trained params", "seeds"], rows,
              title=f"\n{TARGET}, {n_demos} demonstrations, {cfg['eval_episodes']} unseen seeds"))
    say(f"pretrained - scratch: {diff[0]:+.3f} ± {diff[1]:.3f} SR (paired over seeds)")


def _throughput(model_cfg: VLNConfig, tok, cache, quick: bool) -> dict:
    """Samples/s of the pretraining step, on real demonstrations: CPU (1 thread), and the GPU."""
    demos = load_level_demos(DEFAULT_LEVELS[:2], (0, 4 if quick else 50), str(cache), "throughput demos")
    data = encode_demos(demos, tok, model_cfg.max_len, model_cfg.memory)
    out = {"cpu_1_thread": pretraining_throughput(model_cfg, data, "cpu", (64,), steps=3 if quick else 20)}
    say(f"[vln] pretraining throughput, CPU 1 thread: {out['cpu_1_thread'][64]:.0f} samples/s (batch 64)")
    if torch.cuda.is_available():
        out["gpu_name"] = torch.cuda.get_device_name(0)
        out["gpu_samples_per_s"] = pretraining_throughput(model_cfg, data, "cuda", (64, 256, 1024), steps=30)
        say(f"[vln] pretraining throughput on {out['gpu_name']}: "
            + ", ".join(f"batch {b}: {v:.0f} samples/s" for b, v in out["gpu_samples_per_s"].items()))
    return out


def _model_for(start: str, backbone: VLNBackbone, seed: int = 0) -> torch.nn.Module:
    if start == "scratch":
        # another seed than the backbone's own initialization, so "scratch" is not the pretraining start
        return VLNBackbone(dataclasses.replace(backbone.cfg, seed=backbone.cfg.seed + 1 + seed))
    model = copy.deepcopy(backbone)
    if start == "adapters":
        return adapt_backbone(model, AdapterConfig(adapter="waffle", n_factors=8, seed=seed))
    return model


def _plot(out: dict, opts: Options) -> None:
    plt = pyplot()
    sizes = list(out["results"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        methods = out["results"][n]["methods"]
        x = np.arange(len(methods))
        ax.bar(x - 0.2, [m["success_rate"][0] for m in methods.values()], 0.4,
               yerr=[m["success_rate"][1] for m in methods.values()], label="SR", capsize=3)
        ax.bar(x + 0.2, [m["spl"][0] for m in methods.values()], 0.4,
               yerr=[m["spl"][1] for m in methods.values()], label="SPL", capsize=3)
        ax.set_xticks(x, [k.replace("+", "\n+") for k in methods], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{out['settings']['target']}: {n} demonstrations, mean ± s.e.")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
