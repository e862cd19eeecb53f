"""Federated factorized adaptation of the pretrained VLN backbone vs local-only and centralized.

Three sites, each holding one BabyAI level (non-IID), adapt the same pretrained backbone (the
demo's, ktfed.demo_backbone) with WAFFLe adapters, the same local steps per round and the same
rounds, from the same data:

  local-only    each site trains its adapters on its own level alone
  federated     after every round the coordinator's sample-weighted mean of the sites' shared
                factors (the coordinator's FedAvg, via bench.waffle_sim.fedavg_mean) replaces each site's; what is
                private (the factor selection and, in this recipe, the action head) stays
  centralized   one model on all three sites' demonstrations pooled, with the three sites' steps
                together per round (the upper reference: it needs the data to leave the sites)

Each site's model is rolled out on unseen evaluation seeds of its own level (success rate, SPL);
the centralized model on each level. Every kind is trained from TRAIN_SEEDS independent seeds
(adapter initialization, batch order, gate samples); the table gives the mean over seeds ± its
standard error, and federated − local-only is taken per seed (paired) before averaging.

The setting: little data per site, federation's case. Each site holds RECIPE["episodes"] = 50
bot demonstrations of its level (250-380 samples); with 100 the sites alone did about as well.
The recipe was chosen on a validation block of seeds (finetune.validation_seeds, 50 per level;
training seeds 0-2), never on the evaluation seeds the table reports, which are rolled out after
training with other seeds (TRAIN_SEEDS):
  * the action head is private (AdapterConfig.private_head, a FedPer-style personal head): the
    levels need different actions (pickup, toggle), and averaging the heads mixes those action
    priors. With the shared head, federated was far below local-only (validation, 100 episodes,
    8 x 40 steps, lr 5e-3: 0.26 vs 0.40 mean SR); with a private head 0.45 vs 0.40, and 0.41 vs
    0.49 on a second seed: at 100 episodes per site neither wins reliably.
  * 16 rounds x 10 local steps (shorter rounds drift less; half the earlier 8 x 40, for run time;
    not compared separately).
  * each kind trains at its own best learning rate on the validation block (mean SR over 2-3
    training seeds; the pretrained backbone itself scores 0.307 there):
        lr          5e-4   1e-3   2e-3   5e-3   1e-2
        local-only  0.320  0.329  0.287  0.238    -      a site alone over-fits its 50 episodes
        federated     -    0.280  0.357  0.384  0.370
        centralized   -      -    0.263  0.300    -
    So at one shared learning rate federated wins where local training over-fits (2e-3, 5e-3)
    and loses where it barely moves (1e-3); the comparison gives each kind its own best.
  * WAFFLe's private factor selection hardly trains here: under Adam the gates' gradient
    multiplier (gate_lr_scale) is normalized away, so a gate logit moves at most lr per step and
    all 512 gates stay on in 160 steps. Giving the gates 10x Adam's learning rate did make the
    sites select different factors (~95 of 512 on), without a better SR (0.32 vs 0.43, one seed).
Nothing else differs between the kinds. Every model keeps its optimizer from round to round
(kt_core.site_optimizer), as a participant does. The table of learning rates above was for the
earlier reactive backbone (width 64, 16 factors). With the demo's current one (width 128, memory
4, 12 pretraining levels; 8 factors per layer) they were selected again on the validation block
(training seeds 0-1, 50 seeds per level, mean SR):
        lr          5e-4   1e-3   2e-3   5e-3   1e-2
        local-only  0.447  0.390  0.340    -      -
        federated     -      -    0.440  0.390  0.357
so both kinds now train gentler: the stronger backbone loses what it knew at the old rates (the
edges: local-only 2e-4 0.400, federated 1e-3 0.443; the backbone alone 0.347 there). FedProx's
proximal term (prox_mu, towards the model the site starts each round from) on the same block:
        prox_mu            0      0.1    1      3      10
        local-only 5e-4  0.447     -    0.470    -      -     (1e-3 with mu 1: 0.460)
        federated 2e-3   0.440   0.453  0.467  0.457  0.460   (5e-3 with mu 1: 0.407)
It keeps GoToLocal, a level pretraining covers, at the backbone's 0.66-0.68 where plain training
dropped it, for both kinds alike. Run with mu 1 on the evaluation seeds it raised both kinds on
LEVELS (local-only 0.406, federated 0.417) and lowered both on OTHER_LEVELS (0.102 / 0.106 vs
0.175 / 0.189 without it: holding each round near its start stops a site learning what the
backbone cannot do), so it is off (PROX_MU): a recipe that only helps where it was chosen. Also
measured there and not adopted: 32 rounds x 5 steps (client drift; federated 0.397), and a
backbone whose memory leaves out the past actions (VLNConfig.memory_actions False, against
copying the previous action): local-only 0.400, federated 0.387, below 0.447 / 0.440 with them.
`compare(..., validation=True)` reruns a selection. After the bench's levels the same recipe
runs unchanged on OTHER_LEVELS, which no pretraining used, without centralized.

In process, with the product's own functions (kt_core.vln.*, kt_core.models shared/private state);
the wire is measured elsewhere (bench/overhead, bench/bytes). Bytes per update: the shared factors
vs the dense backbone. Demonstrations and bot references are cached under $KTFED_CACHE_DIR/babyai.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import textwrap
import time
from pathlib import Path

import torch

from bench.common import Options, pyplot, say, table
from bench.waffle_sim import fedavg_mean
from kt_core.factorized import FactorizedLinear
from kt_core.models import load_shared_state, shared_state
from kt_core.site_optimizer import SiteOptimizer
from kt_core.train import TrainConfig
from kt_core.vln.adapt import AdapterConfig, adapt_backbone
from kt_core.vln.babyai import default_cache_dir, get_demos
from kt_core.vln.backbone import VLNBackbone, VLNConfig, count_parameters
from kt_core.vln.checkpoint import LoadedBackbone, load_backbone
from kt_core.vln.finetune import (DemoTensors, encode_demos, eval_seeds, evaluate, evaluate_rollouts, site_data,
                                  train_local, validation_seeds)
from kt_core.vln.tokenizer import Tokenizer

NAME = "vln_fed"
DESCRIPTION = "VLN adapters: federated (WAFFLe) vs local-only vs centralized, 3 non-IID sites with little data"
LEVELS = ("BabyAI-PickupDist-v0", "BabyAI-GoToLocal-v0", "BabyAI-OpenDoor-v0")
# the same recipe, unchanged, on three levels that no pretraining used (nor was anything tuned on)
OTHER_LEVELS = ("BabyAI-PickupLoc-v0", "BabyAI-UnlockLocal-v0", "BabyAI-GoToObjMazeS4-v0")
KINDS = ("local-only", "federated", "centralized")
ADAPTER = AdapterConfig(adapter="waffle", n_factors=8, private_head=True)
# each kind's best on validation with the current backbone (see the module doc; centralized takes
# federated's, the same pooled steps)
LR = {"local-only": 5e-4, "federated": 2e-3, "centralized": 2e-3}
# FedProx's proximal term (TrainConfig.prox_mu, towards the model a site starts the round from):
# off. mu 1 was best on validation for both kinds on LEVELS (the module doc), and on OTHER_LEVELS,
# which it was not chosen on, it cost both kinds 0.07-0.08 SR (bench/README: vln_fed)
PROX_MU = {"local-only": 0.0, "federated": 0.0, "centralized": 0.0}
RECIPE = dict(episodes=50, rounds=16, steps=10, lr=LR, prox_mu=PROX_MU, batch_size=32)
QUICK = dict(episodes=4, rounds=2, steps=2, lr=LR, prox_mu=PROX_MU, batch_size=32)   # a smoke test (see quick_backbone)
TRAIN_SEEDS = (10, 11, 12, 13, 14)  # not the seeds (0, 1, 2) the recipe was selected with
ROLLOUTS = 100              # unseen evaluation seeds per level
CURVE_EVERY = 4             # rounds between held-out accuracy points (each costs ~1 s per model)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    values = list(values)
    if len(values) < 2:
        return float(values[0]), 0.0
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def prox_mu(recipe: dict, kind: str) -> float:
    """The kind's proximal-term weight in `recipe` (0 where it names none)."""
    return recipe.get("prox_mu", {}).get(kind, 0.0)


def _pool(data: list[DemoTensors]) -> DemoTensors:
    return DemoTensors.concat(data)


def train_kinds(base, data: list[DemoTensors], recipe: dict, seed: int, held_out: list[DemoTensors],
                kinds=KINDS) -> tuple[dict, dict]:
    """Train each kind from `base` (adapters initialized with `seed`). Returns {kind: one model per
    site} and {kind: mean action accuracy on `held_out` (unseen demonstrations) before round 1 and
    after every CURVE_EVERY rounds, "round": those rounds}."""
    tc = TrainConfig(epochs=10**6, max_steps=recipe["steps"], batch_size=recipe["batch_size"], optimizer="adam",
                     max_grad_norm=1.0)

    optimizers: dict[int, SiteOptimizer] = {}   # each model keeps its optimizer, as a site does

    def train(kind, model, d, r, i, scale=1):
        # the same batch order and gate samples for site i in round r, whichever kind trains it
        cfg = dataclasses.replace(tc, lr=recipe["lr"][kind], prox_mu=prox_mu(recipe, kind),
                                  seed=100_000 * seed + 1000 * r + i, max_steps=recipe["steps"] * scale)
        kept = optimizers.setdefault(id(model), SiteOptimizer(model))
        train_local(model, d, cfg, optimizer=kept.for_round(cfg))

    models = {k: [copy.deepcopy(base) for _ in data] for k in kinds if k != "centralized"}
    if "centralized" in kinds:
        models["centralized"] = [copy.deepcopy(base)] * len(data)   # one model, evaluated on every level
        pooled = _pool(data)
    start = statistics.mean(evaluate(base, h)["accuracy"] for h in held_out)
    curves = {"round": [0], **{k: [start] for k in kinds}}      # round 0: the pretrained backbone
    for r in range(recipe["rounds"]):
        for k in ("local-only", "federated"):
            for i, d in enumerate(data if k in models else ()):
                train(k, models[k][i], d, r, i)
        if "federated" in models:
            mean = fedavg_mean([shared_state(m) for m in models["federated"]], [len(d) for d in data])
            for m in models["federated"]:
                load_shared_state(m, mean)
        if "centralized" in models:
            train("centralized", models["centralized"][0], pooled, r, 99, scale=len(data))
        if (r + 1) % CURVE_EVERY and r + 1 < recipe["rounds"]:
            continue
        curves["round"].append(r + 1)
        for k, ms in models.items():
            curves[k].append(statistics.mean(evaluate(m, h)["accuracy"] for m, h in zip(ms, held_out)))
    return models, curves


def evaluate_kinds(models: dict, tokenizer, rollouts: int, validation: bool = False, levels=LEVELS) -> dict:
    """{kind: {level: success_rate, spl}} on unseen seeds of each site's own level."""
    cache = default_cache_dir()
    return {k: {lv: {key: p[key] for key in ("success_rate", "spl")}
                for lv, p in ((lv, evaluate_rollouts(m, tokenizer, lv, rollouts, cache, validation=validation))
                              for m, lv in zip(ms, levels))}
            for k, ms in models.items()}


def compare(loaded, recipe: dict, seeds, rollouts: int, adapter: AdapterConfig = ADAPTER, kinds=KINDS,
            validation: bool = False, progress=say, levels=LEVELS) -> list[dict]:
    """One record per training seed: per-kind per-level SR/SPL, accuracy curves, gate counts, seconds.
    validation=True: every rollout and accuracy on the validation seed block (for choosing a recipe)."""
    tok, cache = loaded.tokenizer, default_cache_dir()
    records = []
    for seed in seeds:
        t0 = time.perf_counter()
        base = adapt_backbone(copy.deepcopy(loaded.model), dataclasses.replace(adapter, seed=seed))
        data = [encode_demos(site_data(i, [lv], recipe["episodes"], cache), tok, base.cfg.max_len, base.cfg.memory)
                for i, lv in enumerate(levels)]
        unseen = (validation_seeds if validation else eval_seeds)(rollouts)
        held_out = [encode_demos(get_demos(lv, unseen, cache), tok, base.cfg.max_len, base.cfg.memory) for lv in levels]
        models, curves = train_kinds(base, data, recipe, seed, held_out, kinds)
        t1 = time.perf_counter()
        results = evaluate_kinds(models, tok, rollouts, validation, levels)
        gates = {k: [sum(int((mod.gate_logits > 0).sum()) for mod in m.modules() if isinstance(mod, FactorizedLinear))
                     for m in ms] for k, ms in models.items() if k != "centralized"}
        records.append({"seed": seed, "results": results, "accuracy_per_round": curves, "gates_on": gates,
                        "samples_per_site": [len(d) for d in data], "train_s": t1 - t0,
                        "eval_s": time.perf_counter() - t1})
        progress(f"  seed {seed}: " + ", ".join(
            f"{k} {statistics.mean(v['success_rate'] for v in res.values()):.3f}" for k, res in results.items())
            + f" mean SR ({t1 - t0:.0f} s training, {time.perf_counter() - t1:.0f} s rollouts)")
    return records


def summarize(records: list[dict]) -> dict:
    """Mean ± s.e. over seeds of each kind's mean SR/SPL and per-level SR, and the paired differences."""
    def site_mean(rec, k, key):
        return statistics.mean(v[key] for v in rec["results"][k].values())

    kinds = list(records[0]["results"])
    levels = list(records[0]["results"][kinds[0]])
    out = {}
    for k in kinds:
        out[k] = {"success_rate": mean_se(site_mean(r, k, "success_rate") for r in records),
                  "spl": mean_se(site_mean(r, k, "spl") for r in records),
                  "per_site": {lv: mean_se(r["results"][k][lv]["success_rate"] for r in records) for lv in levels}}
    diffs = {}
    if "federated" in out and "local-only" in out:
        diffs["federated_minus_local"] = mean_se(site_mean(r, "federated", "success_rate")
                                                 - site_mean(r, "local-only", "success_rate") for r in records)
    if "federated" in out and "centralized" in out:
        diffs["centralized_minus_federated"] = mean_se(site_mean(r, "centralized", "success_rate")
                                                       - site_mean(r, "federated", "success_rate") for r in records)
    return {"kinds": out, "differences": diffs}


def _plot(records: list[dict], summary: dict, path, title: str) -> None:
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
    kinds = list(summary["kinds"])
    levels = list(summary["kinds"][kinds[0]]["per_site"])
    groups = [*levels, "mean"]
    width = 0.8 / len(kinds)
    for j, k in enumerate(kinds):
        s = summary["kinds"][k]
        vals = [s["per_site"][lv] for lv in levels] + [s["success_rate"]]
        ax0.bar([g + (j - (len(kinds) - 1) / 2) * width for g in range(len(groups))], [v[0] for v in vals], width,
                yerr=[v[1] for v in vals], capsize=3, label=k)
    ax0.set_xticks(range(len(groups)), [g.removeprefix("BabyAI-").removesuffix("-v0") for g in groups])
    ax0.set_ylabel("success rate (unseen seeds)")
    ax0.set_title("success rate, mean ± s.e. over training seeds")
    ax0.legend()
    for k in kinds:
        curves = [r["accuracy_per_round"][k] for r in records]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax1.plot(records[0]["accuracy_per_round"]["round"], mean, marker="o", label=k)
    ax1.set_xlabel("round (0: the pretrained backbone)")
    ax1.set_ylabel("expert-action accuracy, unseen episodes")
    ax1.set_title("per round, mean over sites and seeds")
    ax1.legend()
    fig.suptitle(textwrap.fill(title, 140), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick_backbone() -> LoadedBackbone:
    """--quick: a small untrained backbone (bench/vln's quick size). Pretraining the demo's (once,
    cached) takes minutes; a smoke test of the comparison needs none of it, and its SR means nothing."""
    tokenizer = Tokenizer()
    config = VLNConfig(d_model=32, n_heads=4, n_lang_layers=1, n_vision_layers=0, n_cross_layers=1,
                       vocab_size=len(tokenizer))
    return LoadedBackbone(VLNBackbone(config), tokenizer, config, sha256="", path=Path("(untrained, --quick)"))


def run(opts: Options) -> dict:
    from ktfed.demo_backbone import demo_backbone

    torch.set_num_threads(1)
    recipe = dict(QUICK if opts.quick else RECIPE)
    if opts.rounds:
        recipe["rounds"] = opts.rounds
    seeds, rollouts = ((0,), 1) if opts.quick else (TRAIN_SEEDS, ROLLOUTS)
    loaded = quick_backbone() if opts.quick else load_backbone(demo_backbone())
    base = adapt_backbone(copy.deepcopy(loaded.model), ADAPTER)
    shared = sum(t.numel() for t in shared_state(base).values()) * 4
    dense = count_parameters(loaded.model) * 4
    opts.out.mkdir(parents=True, exist_ok=True)
    out = {"recipe": recipe, "adapter": ADAPTER.to_dict(), "rollouts": rollouts, "train_seeds": list(seeds),
           "bytes_shared": shared, "bytes_dense": dense,
           "seeds": {"site_i_training_episodes": "100000 + 10000 i + [0, episodes)",
                     "evaluation": f"[1000000, {1000000 + rollouts})",
                     "validation (recipe selection only)": "[2000000, ...)",
                     "training": "TrainConfig.seed = 100000 * train_seed + 1000 * round + site (99: centralized)"}}
    # the bench's levels, then the same recipe unchanged on levels no pretraining used
    out["levels"] = run_levels(loaded, recipe, seeds, rollouts, LEVELS, opts.out / f"{NAME}.png")
    out["other_levels"] = run_levels(loaded, recipe, seeds, rollouts, OTHER_LEVELS, opts.out / f"{NAME}_other.png",
                                     kinds=("local-only", "federated"))
    say(f"bytes per update: {shared:,} (shared factors) vs {dense:,} dense ({dense / shared:.1f}x)")
    return out


def run_levels(loaded, recipe: dict, seeds, rollouts: int, levels, png: Path, kinds=KINDS) -> dict:
    """The comparison on one set of levels (one site per level): table, PNG, records."""
    t0 = time.perf_counter()
    base = adapt_backbone(copy.deepcopy(loaded.model), ADAPTER)
    backbone = evaluate_kinds({"backbone": [base] * len(levels)}, loaded.tokenizer, rollouts, levels=levels)["backbone"]
    say(f"  {', '.join(levels)}: pretrained backbone, no adaptation: "
        f"{statistics.mean(v['success_rate'] for v in backbone.values()):.3f} mean SR ({time.perf_counter() - t0:.0f} s)")
    records = compare(loaded, recipe, seeds, rollouts, kinds=kinds, levels=levels)
    summary = summarize(records)

    def pm(v, spec=".3f"):
        return f"{v[0]:{spec}} ± {v[1]:{spec.lstrip('+')}}"

    rows = [[k, f"{recipe['lr'][k]:g}", f"{prox_mu(recipe, k):g}", pm(s["success_rate"]), pm(s["spl"]),
             "  ".join(pm(v, ".2f") for v in s["per_site"].values())] for k, s in summary["kinds"].items()]
    rows.append(["backbone (no adaptation)", "-", "-", f"{statistics.mean(v['success_rate'] for v in backbone.values()):.3f}",
                 f"{statistics.mean(v['spl'] for v in backbone.values()):.3f}",
                 "  ".join(f"{v['success_rate']:.2f}" for v in backbone.values())])
    title = (f"{len(levels)} sites with little data each ({recipe['episodes']} bot episodes of one level, "
             f"~{statistics.mean(records[0]['samples_per_site']):.0f} samples), {recipe['rounds']} rounds x "
             f"{recipe['steps']} local steps, private action head, each kind at its validated lr; mean ± s.e. over "
             f"{len(seeds)} training seed(s), {rollouts} unseen evaluation seeds per level")
    say(table(["training", "lr", "prox_mu", "mean SR", "mean SPL", "SR per site (" + ", ".join(levels) + ")"], rows,
              title=title))
    d = summary["differences"]
    say(f"federated - local-only: {pm(d['federated_minus_local'], '+.3f')} SR (paired over seeds)"
        + (f"; gap to centralized: {pm(d['centralized_minus_federated'], '+.3f')} SR"
           if "centralized_minus_federated" in d else ""))
    _plot(records, summary, png, title)
    return {"levels": list(levels), "summary": summary, "backbone": backbone, "records": records, "png": png}
