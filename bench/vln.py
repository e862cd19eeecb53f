"""The PREVALENT claim on BabyAI: a pretrained backbone fine-tuned on a level it never saw beats the
same architecture trained from scratch with the same fine-tuning budget, on unseen seeds.

Pretraining: attended MLM + action prediction on bot demonstrations of six navigation levels
(go to objects and doors, open doors: no picking up). Target: BabyAI-PickupDist-v0 ("pick up the
red key" among distractors), which needs an action the pretraining data never shows. Every method
gets the same target demonstrations (site 0's seed block), the same number of optimizer steps and
batch size, and is evaluated by rollouts on the same unseen seeds (the evaluation block):

  zero-shot     the pretrained backbone as is
  pretrained    the pretrained backbone, every weight fine-tuned
  +waffle       the pretrained backbone frozen, WAFFLe adapters on its cross-modal layers + action head
  scratch       the same architecture from a random initialization, every weight trained

"pretrained" and "scratch" each run at two learning rates (5e-4 and 2e-3, Adam); the claim compares
the better run of each (chosen on the evaluation seeds for both alike).

Also reported: pretraining throughput (samples/s) on CPU (one thread), and on a GPU when one is here.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import torch

from bench.common import Options, pyplot, say, table
from kt_core.train import TrainConfig
from kt_core.vln.adapt import AdapterConfig, adapt_backbone
from kt_core.vln.babyai import default_cache_dir, get_demos
from kt_core.vln.backbone import VLNBackbone, VLNConfig, count_parameters
from kt_core.vln.finetune import encode_demos, eval_seeds, evaluate, evaluate_rollouts, site_data, train_local
from kt_core.vln.pretrain import (DEFAULT_LEVELS, PretrainSettings, load_level_demos, pretrain,
                                  pretraining_throughput)

NAME = "vln"
DESCRIPTION = "pretrained VLN backbone vs the same architecture from scratch, fine-tuned on a held-out BabyAI level"
TARGET = "BabyAI-PickupDist-v0"
LRS = (5e-4, 2e-3)
ADAPTER_LR = 5e-3
# (label, where the model starts, fine-tuning learning rate: None = no fine-tuning)
METHODS = (("zero-shot", "pretrained", None),
           *((f"pretrained, lr {lr:g}", "pretrained", lr) for lr in LRS),
           ("pretrained+waffle", "adapters", ADAPTER_LR),
           *((f"scratch, lr {lr:g}", "scratch", lr) for lr in LRS))


def settings(opts: Options) -> dict:
    """--quick is a smoke test of the whole pipeline (a 40k-parameter model, minutes of training
    cut to a few dozen steps): too small to learn the target level, so its verdict means nothing.
    The claim is measured by the full run. --rounds N sets the pretraining steps."""
    if opts.quick:
        return {"model": VLNConfig(d_model=32, n_heads=4, n_lang_layers=1, n_vision_layers=0, n_cross_layers=1),
                "pretrain": PretrainSettings(levels=DEFAULT_LEVELS[:2], episodes_per_level=10, val_episodes=4,
                                             rollout_episodes=0, steps=opts.rounds or 20, batch_size=32, lr=2e-3,
                                             warmup_steps=5),
                "target": TARGET, "finetune_episodes": 5, "finetune_steps": 5, "eval_episodes": 4}
    return {"model": VLNConfig(d_model=64, n_heads=4, n_lang_layers=1, n_vision_layers=0, n_cross_layers=2),
            "pretrain": PretrainSettings(levels=DEFAULT_LEVELS, episodes_per_level=400, val_episodes=40,
                                         rollout_episodes=0, steps=opts.rounds or 1500, batch_size=64, lr=2e-3),
            "target": TARGET, "finetune_episodes": 50, "finetune_steps": 300, "eval_episodes": 100}


# the fine-tuning recipe, the same for every method but the learning rate (the adapters get a larger
# one: they start from zero deltas and carry fewer parameters, as is usual for LoRA-style tuning)
FINETUNE = dict(batch_size=32, optimizer="adam", max_grad_norm=1.0, seed=0)


def run(opts: Options) -> dict:
    torch.set_num_threads(1)
    cfg = settings(opts)
    cache = default_cache_dir()
    pre: PretrainSettings = dataclasses.replace(cfg["pretrain"], cache_dir=str(cache))
    say(f"[vln] pretraining on {len(pre.levels)} levels x {pre.episodes_per_level} episodes (seeds "
        f"{list(pre.train_seeds)}), {pre.steps} steps of batch {pre.batch_size}; demonstrations cached in {cache}")
    result = pretrain(cfg["model"], pre, progress=True)
    backbone, tok = result.model, result.tokenizer
    say(f"[vln] pretrained {count_parameters(backbone):,} parameters in {result.seconds:.0f} s "
        f"({result.samples_per_s:.0f} samples/s, 1 CPU thread); unseen seeds: action accuracy "
        f"{result.metrics['val_action_accuracy']:.3f}, masked-word accuracy {result.metrics['val_mlm_accuracy']:.3f}")

    target = cfg["target"]
    train_demos = site_data(0, [target], cfg["finetune_episodes"], cache)
    train = encode_demos(train_demos, tok, backbone.cfg.max_len)
    test_seeds = eval_seeds(cfg["eval_episodes"])
    test = encode_demos(get_demos(target, test_seeds, cache), tok, backbone.cfg.max_len)
    say(f"[vln] fine-tuning on {target}: {train_demos.num_episodes} episodes ({len(train)} samples, seeds "
        f"{list(train_demos.seeds)}), {cfg['finetune_steps']} steps of batch {FINETUNE['batch_size']}; evaluation on "
        f"{cfg['eval_episodes']} unseen seeds {list(test_seeds)}")

    rows, methods = [], {}
    for method, start, lr in METHODS:
        model = _model_for(start, backbone)
        t0 = time.monotonic()
        trained = None
        if lr is not None:
            tc = TrainConfig(epochs=10**6, max_steps=cfg["finetune_steps"], kl_weight=1.0, lr=lr, **FINETUNE)
            trained = train_local(model, train, tc)
        roll = evaluate_rollouts(model, tok, target, cfg["eval_episodes"], cache)
        acc = evaluate(model, test)["accuracy"]
        n = roll["episodes"]
        methods[method] = {**roll, "action_accuracy": acc, "trainable_parameters": count_parameters(model, True),
                           "lr": lr if trained else None, "steps": trained.steps if trained else 0,
                           "train_loss": trained.loss if trained else None, "seconds": time.monotonic() - t0,
                           "sr_stderr": math.sqrt(roll["success_rate"] * (1 - roll["success_rate"]) / n)}
        m = methods[method]
        rows.append([method, f"{m['success_rate']:.3f} ± {m['sr_stderr']:.3f}", f"{m['spl']:.3f}",
                     f"{acc:.3f}", f"{m['mean_steps']:.1f}", f"{m['trainable_parameters']:,}", f"{m['steps']}",
                     f"{m['seconds']:.1f}"])
    say(table(["method", "SR ± s.e.", "SPL", "action acc", "steps/episode", "trained params", "FT steps", "wall s"],
              rows, title=f"\n{target}, {cfg['eval_episodes']} unseen seeds (bot: "
                          f"{methods['zero-shot']['mean_bot_steps']:.1f} steps/episode)"))

    def best(prefix):
        return max(((k, m) for k, m in methods.items() if k.startswith(prefix)),
                   key=lambda km: (km[1]["success_rate"], km[1]["spl"]))

    (p_name, p), (s_name, s) = best("pretrained, "), best("scratch, ")
    holds = p["success_rate"] > s["success_rate"] and p["spl"] > s["spl"]
    if opts.quick:
        verdict = "not measured by --quick (a smoke test: its models are too small and briefly trained to learn " \
                  "the target; run without --quick)"
    else:
        verdict = "holds" if holds else "DOES NOT hold"
    say(f"PREVALENT claim (pretrained + fine-tuning beats scratch with the same budget, SR and SPL): {verdict} "
        f"({p_name}: SR {p['success_rate']:.3f}, SPL {p['spl']:.3f}; {s_name}: SR {s['success_rate']:.3f}, "
        f"SPL {s['spl']:.3f})")

    throughput = {"cpu_1_thread": result.samples_per_s}
    if torch.cuda.is_available():
        throughput.update(gpu_throughput(cfg["model"], pre, tok))
        say(f"[vln] pretraining throughput on {throughput['gpu_name']}: "
            + ", ".join(f"batch {b}: {v:.0f} samples/s" for b, v in throughput["gpu_samples_per_s"].items()))
    out = {"settings": {"model": cfg["model"].to_dict(), "pretrain": dataclasses.asdict(pre), "target": target,
                        "finetune_episodes": cfg["finetune_episodes"], "finetune_steps": cfg["finetune_steps"],
                        "finetune": FINETUNE, "lrs": list(LRS), "adapter_lr": ADAPTER_LR, "eval_episodes": cfg["eval_episodes"],
                        "seeds": {"pretrain": list(pre.train_seeds), "pretrain_val": list(pre.val_seeds),
                                  "finetune": list(train_demos.seeds), "eval": list(test_seeds)}},
           "pretraining": {"seconds": result.seconds, "samples_per_s": result.samples_per_s,
                           "metrics": result.metrics, "parameters": count_parameters(backbone),
                           "final_mlm": float(np.mean(result.history["mlm"][-50:])),
                           "final_action": float(np.mean(result.history["action"][-50:]))},
           "throughput": throughput, "methods": methods,
           "claim_holds": None if opts.quick else holds, "claim": {"pretrained": p_name, "scratch": s_name}}
    _plot(out, result.history, opts)
    return out


def _model_for(start: str, backbone: VLNBackbone) -> torch.nn.Module:
    if start == "scratch":
        # another seed than the backbone's own initialization, so "scratch" is not the pretraining start
        return VLNBackbone(dataclasses.replace(backbone.cfg, seed=backbone.cfg.seed + 1))
    model = copy.deepcopy(backbone)
    if start == "adapters":
        return adapt_backbone(model, AdapterConfig(adapter="waffle", n_factors=16))
    return model


def gpu_throughput(model_cfg: VLNConfig, pre: PretrainSettings, tok) -> dict:
    """Samples/s of the pretraining step on the GPU at a few batch sizes, on real demonstrations."""
    demos = load_level_demos(pre.levels[:2], (0, 50), pre.cache_dir, "gpu demos")
    data = encode_demos(demos, tok, model_cfg.max_len)
    cfg = dataclasses.replace(model_cfg, vocab_size=len(tok))
    return {"gpu_name": torch.cuda.get_device_name(0),
            "gpu_samples_per_s": pretraining_throughput(cfg, data, "cuda", (64, 256, 1024), steps=30)}


def _plot(out: dict, history: dict, opts: Options) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("mlm", "masked LM"), ("action", "action")):
        y = np.asarray(history[key])
        w = max(1, len(y) // 50)
        ax1.plot(np.arange(len(y) - w + 1) + w, np.convolve(y, np.ones(w) / w, mode="valid"), label=label)
    ax1.set_yscale("log")
    ax1.set_xlabel("pretraining step")
    ax1.set_ylabel("cross-entropy (moving average)")
    ax1.set_title("pretraining losses")
    ax1.grid(alpha=0.3)
    ax1.legend()
    methods = out["methods"]
    x = np.arange(len(methods))
    sr = [m["success_rate"] for m in methods.values()]
    ax2.bar(x - 0.2, sr, 0.4, yerr=[m["sr_stderr"] for m in methods.values()], label="SR", capsize=3)
    ax2.bar(x + 0.2, [m["spl"] for m in methods.values()], 0.4, label="SPL")
    ax2.set_xticks(x, [k.replace(", ", "\n").replace("+", "\n+") for k in methods], fontsize=8)
    ax2.set_ylim(0, 1)
    ax2.set_title(f"{out['settings']['target']}: {out['settings']['eval_episodes']} unseen seeds")
    ax2.legend()
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
