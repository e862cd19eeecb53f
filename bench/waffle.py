"""WAFFLe replication (Hao et al., IEEE Access 2022), in-process: 10 sites with 2-class shards.

Methods, all on the same MLP architecture and the same per-site data:
  waffle   shared dictionary W_a, W_b, r and biases aggregated; each site keeps its own factor
           selection (gates, IBP posterior) private across rounds
  fedavg   dense MLP, every weight shared (plain FedAvg)
  local    dense MLP, each site trains alone for the same number of local epochs, nothing shared

Aggregation is the coordinator's own `coordinator.strategy.FedAvg` (updates = deltas of the
shared state, weighted by sample count); models, training and evaluation are kt_core's.
Accuracy is each site's local test accuracy on its own classes (its `site_split` test part),
after the round's aggregation: the global shared state plus, for WAFFLe, the site's private gates.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from coordinator.strategy import FedAvg
from kt_core.data import PartitionSpec, fashion_mnist_available, load_dataset, site_split
from kt_core.manifest import manifest_of
from kt_core.models import ModelConfig, build_model, load_shared_state, shared_state
from kt_core.train import TrainConfig, evaluate, train_local

from bench.common import Options, mib, pyplot, say, site_names, table

NAME = "waffle"
DESCRIPTION = "WAFFLe vs FedAvg vs local-only, 10 sites with 2-class shards (in-process simulation)"
N_SITES = 10
HIDDEN = (256, 128)
N_FACTORS = 16
BATCH_SIZE = 64
LR = 0.05
# the same recipe for every method; the clip keeps WAFFLe's factor products from diverging at this lr
# (without it, WAFFLe's loss goes NaN on Fashion-MNIST within the first rounds at lr 0.05)
MAX_GRAD_NORM = 1.0
METHODS = ("waffle", "fedavg", "local")
MODE = {"waffle": "waffle", "fedavg": "dense", "local": "dense"}


def settings(opts: Options) -> dict:
    dataset = opts.dataset
    note = None
    if opts.quick and dataset == "auto":
        dataset = "digits"
    if dataset in ("auto", "fashion-mnist") and not fashion_mnist_available():
        note = "Fashion-MNIST is not installed here (/usr/share/datasets/fashion-mnist): using sklearn digits"
        dataset = "digits"
    elif dataset == "auto":
        dataset = "fashion-mnist"
    default_train = 20000 if dataset == "fashion-mnist" else 0
    max_train = default_train if opts.max_train is None else opts.max_train
    return {"dataset": dataset, "note": note, "max_train": max_train or None,
            "rounds": opts.rounds or (3 if opts.quick else 30), "epochs": opts.epochs or 1,
            "sites": N_SITES, "hidden": list(HIDDEN), "n_factors": N_FACTORS, "batch_size": BATCH_SIZE, "lr": LR,
            "max_grad_norm": MAX_GRAD_NORM, "optimizer": "sgd, momentum 0.9", "partition": "shards, 2 classes per site, seed 0"}


def run(opts: Options) -> dict:
    cfg = settings(opts)
    if cfg["note"]:
        say(f"[waffle] NOTE: {cfg['note']}")
    torch.set_num_threads(1)  # small MLPs: one thread is as fast here, and steadier
    data = load_dataset(cfg["dataset"], max_train=cfg["max_train"])
    sites = site_names(N_SITES)
    spec = PartitionSpec(scheme="shards", classes_per_site=2, seed=0)
    splits = {s: site_split(data, sites, s, spec) for s in sites}
    say(f"[waffle] {data.name}: {len(data.train_y)} training samples over {N_SITES} sites "
        f"({min(len(v[1]) for v in splits.values())}-{max(len(v[1]) for v in splits.values())} each, classes "
        f"{', '.join(f'{sorted(set(v[1].tolist()))}' for v in list(splits.values())[:3])}, ...), "
        f"{cfg['rounds']} rounds x {cfg['epochs']} local epoch(s), MLP {list(HIDDEN)}")
    out = {"settings": cfg, "site_classes": {s: sorted(set(v[1].tolist())) for s, v in splits.items()},
           "site_samples": {s: [int(len(v[1])), int(len(v[3]))] for s, v in splits.items()}, "methods": {}}
    for method in METHODS:
        out["methods"][method] = simulate(method, data.input_dim, splits, cfg)

    rows = []
    for method, m in out["methods"].items():
        final, pre = m["final"], m["final_after_local_training"]
        rows.append([method, f"{final['mean']:.4f}", f"{final['std']:.4f}", f"{final['min']:.3f}",
                     f"{final['max']:.3f}", f"{pre['mean']:.4f}", f"{m['shared_params']:,}",
                     mib(m["bytes_up_per_round_per_site"]) if m["bytes_up_per_round_per_site"] else "0",
                     f"{m['wall_s']:.1f}"])
    say(table(["method", "acc mean", "acc std", "min", "max", "acc after local training", "shared params",
               "up/round/site", "wall s"], rows,
              title=f"\nlocal test accuracy across {N_SITES} sites after round {cfg['rounds']} "
                    f"({data.name}, each site's own 2 classes; after aggregation)"))
    w, f = out["methods"]["waffle"], out["methods"]["fedavg"]
    g = w["private_gates"]
    say(f"\nWAFFLe private factor selection after the last round: gates on per layer (of {g['of']}) per site: "
        f"{'; '.join(f'{s} {v}' for s, v in g['on_per_layer'].items())}")
    say(f"  {g['fraction_on']:.2f} of all gates on; {g['distinct_patterns']} distinct selections over {N_SITES} sites, "
        f"mean pairwise Hamming distance {g['mean_pairwise_hamming']:.3f} (0 = identical); gate logits moved "
        f"{g['mean_abs_logit_change']:.3f} on average (max layer mean {g['max_abs_logit_change']:.3f}) from their "
        f"initial values (mean {g['initial_logit_mean']:.2f})")
    if w["bytes_up_per_round_per_site"]:
        say(f"\nbytes per round per site: WAFFLe {mib(w['bytes_up_per_round_per_site'])} vs FedAvg "
            f"{mib(f['bytes_up_per_round_per_site'])} up, the same again down "
            f"({f['bytes_up_per_round_per_site'] / w['bytes_up_per_round_per_site']:.1f}x fewer)")
    _plot(out, opts)
    return out


def _summary(accs) -> dict:
    a = np.asarray(accs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def simulate(method: str, input_dim: int, splits: dict, cfg: dict) -> dict:
    from tqdm import tqdm

    started = time.monotonic()
    sites = list(splits)
    model_cfg = ModelConfig(mode=MODE[method], input_dim=input_dim, hidden=HIDDEN, num_classes=10,
                            n_factors=N_FACTORS, seed=0)
    models = {s: build_model(model_cfg) for s in sites}
    initial_gates = {s: [m.gate_logits.detach().clone() for m in mod.modules() if hasattr(m, "gate_logits")]
                     for s, mod in models.items()}
    manifest = manifest_of(models[sites[0]])
    tensors = {s: (torch.from_numpy(v[0]), torch.from_numpy(v[1]), torch.from_numpy(v[2]), torch.from_numpy(v[3]))
               for s, v in splits.items()}
    federated = method != "local"
    strategy = FedAvg()
    global_state = {n: t.numpy() for n, t in shared_state(models[sites[0]]).items()}
    curve, curve_pre = [], []
    # a bar on a terminal; a line every ~10% of the rounds in a log
    tty = sys.stderr.isatty()
    every = max(1, cfg["rounds"] // 10)
    bar = tqdm(range(1, cfg["rounds"] + 1), desc=f"  {method:<7}", unit="round", mininterval=1.0, leave=True,
               disable=not tty)
    for rnd in bar:
        if federated:
            strategy.begin(global_state)
        pre = []
        for i, site in enumerate(sites):
            x, y, tx, ty = tensors[site]
            model = models[site]
            if federated:
                load_shared_state(model, {n: torch.from_numpy(a.copy()) for n, a in global_state.items()})
            train_local(model, x, y, TrainConfig(epochs=cfg["epochs"], batch_size=BATCH_SIZE, lr=LR,
                                                 max_grad_norm=MAX_GRAD_NORM, seed=rnd * 1000 + i))
            pre.append(evaluate(model, tx, ty)["accuracy"])
            if federated:
                strategy.add({n: t.numpy() - global_state[n] for n, t in shared_state(model).items()}, len(y))
        if federated:
            global_state = strategy.finish()
            post = []
            for site in sites:
                _, _, tx, ty = tensors[site]
                load_shared_state(models[site], {n: torch.from_numpy(a.copy()) for n, a in global_state.items()})
                post.append(evaluate(models[site], tx, ty)["accuracy"])
        else:
            post = pre
        curve.append(post)
        curve_pre.append(pre)
        bar.set_postfix(acc=f"{np.mean(post):.3f}", std=f"{np.std(post):.3f}")
        if not tty and (rnd % every == 0 or rnd == cfg["rounds"]):
            say(f"  {method:<7} round {rnd:>3}/{cfg['rounds']}: local test accuracy {np.mean(post):.3f} "
                f"± {np.std(post):.3f} (after local training {np.mean(pre):.3f}), {time.monotonic() - started:.1f} s")
    bar.close()
    nbytes = manifest.shared_nbytes() if federated else 0
    return {"mode": MODE[method], "shared_params": manifest.shared_numel() if federated else 0,
            "bytes_up_per_round_per_site": nbytes, "bytes_down_per_round_per_site": nbytes,
            "final": _summary(curve[-1]), "final_after_local_training": _summary(curve_pre[-1]),
            "final_per_site": dict(zip(sites, curve[-1])),
            "curve_mean": [float(np.mean(c)) for c in curve], "curve_std": [float(np.std(c)) for c in curve],
            "curve_after_local_training_mean": [float(np.mean(c)) for c in curve_pre],
            "private_gates": _gates(models, initial_gates) if method == "waffle" else None,
            "wall_s": time.monotonic() - started}


def _gates(models: dict, initial: dict) -> dict:
    """What each site's private factor selection looks like: gates on (posterior mode) per layer,
    how far the gate logits moved from their initial values, and how different the sites'
    selections are (Hamming distance between two sites' on/off patterns over all layers)."""
    on, moved, patterns = {}, [], []
    for site, model in models.items():
        layers = [m for m in model.modules() if hasattr(m, "gate_logits")]
        on[site] = [int((m.gate_logits > 0).sum()) for m in layers]
        moved += [float((m.gate_logits.detach() - g0).abs().mean()) for m, g0 in zip(layers, initial[site])]
        patterns.append(np.concatenate([(m.gate_logits.detach() > 0).numpy() for m in layers]))
    p = np.stack(patterns)
    ham = [float(np.mean(p[i] != p[j])) for i in range(len(p)) for j in range(i + 1, len(p))]
    init = np.concatenate([g.numpy() for g in next(iter(initial.values()))])
    return {"on_per_layer": on, "of": N_FACTORS, "fraction_on_per_site": {s: float(v.mean()) for s, v in zip(on, p)},
            "fraction_on": float(p.mean()), "mean_pairwise_hamming": float(np.mean(ham)) if ham else 0.0,
            "distinct_patterns": len({tuple(v) for v in p.tolist()}),
            "initial_logit_mean": float(init.mean()),
            "mean_abs_logit_change": float(np.mean(moved)), "max_abs_logit_change": float(np.max(moved))}


def _plot(out: dict, opts: Options) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, m in out["methods"].items():
        mean, std = np.array(m["curve_mean"]), np.array(m["curve_std"])
        rounds = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(rounds, mean, marker=".", label=f"{method} ({m['final']['mean']:.3f})")
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.15, color=line.get_color())
        if method != "local":
            ax.plot(rounds, m["curve_after_local_training_mean"], ls="--", lw=0.8, color=line.get_color(),
                    label=f"{method}, after local training ({m['final_after_local_training']['mean']:.3f})")
    s = out["settings"]
    ax.set_xlabel("round")
    ax.set_ylabel("local test accuracy (mean ± std over sites)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{s['dataset']}, {s['sites']} sites x 2 classes, {s['epochs']} local epoch(s)/round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
