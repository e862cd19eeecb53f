"""Federated factorized adaptation of the pretrained VLN backbone vs local-only and centralized.

Three sites, each holding one BabyAI level (non-IID), adapt the same pretrained backbone with
WAFFLe adapters, the same number of local steps per round and the same rounds:

  local-only    each site trains its adapters on its own level alone
  federated     FedAvg of the adapters' shared factors after every round (private selections stay)
  centralized   one model on all sites' demonstrations pooled (the upper reference)

Each site's model is rolled out on unseen seeds of its own level (success rate, SPL). In process,
with the product's own functions (kt_core.vln.*, kt_core.models shared/private state); the wire
is measured elsewhere (bench/overhead, bench/bytes). Bytes per round: shared factors vs dense.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics

import numpy as np
import torch

from bench.common import Options, say, table
from kt_core.models import load_shared_state, shared_state
from kt_core.train import TrainConfig
from kt_core.vln.adapt import AdapterConfig, adapt_backbone
from kt_core.vln.backbone import count_parameters
from kt_core.vln.checkpoint import load_backbone
from kt_core.vln.finetune import encode_demos, evaluate_rollouts, site_data, train_local

NAME = "vln_fed"
DESCRIPTION = "VLN adapters: federated (WAFFLe) vs local-only vs centralized, 3 non-IID sites"
LEVELS = ("BabyAI-PickupDist-v0", "BabyAI-GoToLocal-v0", "BabyAI-OpenDoor-v0")


def _mean_state(states: list[dict]) -> dict:
    return {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}


def run(opts: Options) -> dict:
    from ktfed.demo_backbone import demo_backbone

    torch.set_num_threads(1)
    rounds = opts.rounds or (3 if opts.quick else 8)
    episodes, steps, rollouts = (30, 15, 10) if opts.quick else (100, 40, 40)
    loaded = load_backbone(demo_backbone(progress=not opts.quick))
    tok = loaded.tokenizer
    cfg = AdapterConfig(mode="waffle", n_factors=16)
    base = adapt_backbone(copy.deepcopy(loaded.model), cfg)
    data = [encode_demos(site_data(i, [lv], episodes), tok, base.cfg.max_len) for i, lv in enumerate(LEVELS)]
    tc = TrainConfig(epochs=10**6, max_steps=steps, batch_size=32, lr=5e-3, optimizer="adam", max_grad_norm=1.0)

    def train(model, d, r, i, scale=1):
        train_local(model, d, dataclasses.replace(tc, seed=1000 * r + i, max_steps=steps * scale))

    # local-only and federated: one model per site (its private factors stay its own)
    local = [copy.deepcopy(base) for _ in LEVELS]
    fed = [copy.deepcopy(base) for _ in LEVELS]
    central = copy.deepcopy(base)
    pooled = type(data[0])(*(torch.cat([getattr(d, f) for d in data]) for f in ("tokens", "images", "directions",
                                                                               "actions")))
    for r in range(rounds):
        for i, d in enumerate(data):
            train(local[i], d, r, i)
            train(fed[i], d, r, i)
        mean = _mean_state([shared_state(m) for m in fed])
        for m in fed:
            load_shared_state(m, mean)
        train(central, pooled, r, 99, scale=len(LEVELS))   # the three sites' compute, on the pooled data
        say(f"  round {r + 1}/{rounds} done")
    results = {}
    for label, models in (("local-only", local), ("federated", fed), ("centralized", [central] * 3)):
        per_site = [evaluate_rollouts(m, tok, lv, rollouts) for m, lv in zip(models, LEVELS)]
        results[label] = {"success_rate": statistics.mean(p["success_rate"] for p in per_site),
                          "spl": statistics.mean(p["spl"] for p in per_site),
                          "per_site": {lv: {"success_rate": p["success_rate"], "spl": p["spl"]}
                                       for lv, p in zip(LEVELS, per_site)}}
    shared = sum(t.numel() for t in shared_state(base).values()) * 4
    dense = count_parameters(loaded.model) * 4
    rows = [[k, f"{v['success_rate']:.3f}", f"{v['spl']:.3f}",
             " ".join(f"{p['success_rate']:.2f}" for p in v["per_site"].values())] for k, v in results.items()]
    say(table(["training", "mean SR", "mean SPL", "SR per site (" + ", ".join(LEVELS) + ")"], rows,
              title=f"{rounds} rounds x {steps} local steps, {episodes} episodes per site, "
                    f"{rollouts} unseen seeds per level"))
    gap = results["centralized"]["success_rate"] - results["federated"]["success_rate"]
    say(f"federated - local-only: {results['federated']['success_rate'] - results['local-only']['success_rate']:+.3f} SR; "
        f"gap to centralized: {gap:+.3f} SR; bytes per update: {shared:,} (shared factors) vs {dense:,} dense "
        f"({dense / shared:.1f}x)")
    return {"rounds": rounds, "steps": steps, "episodes": episodes, "rollouts": rollouts, "levels": LEVELS,
            "results": results, "bytes_shared": shared, "bytes_dense": dense, "seeds": "site i: block 100000+10000i; "
            "evaluation: 1000000.."}
