"""WAFFLe replication (Hao et al., IEEE Access 2022), in-process: 10 sites with 2-class shards.

Methods, all on the same MLP architecture and the same per-site data:
  waffle   shared dictionary W_a, W_b, r and biases aggregated; each site keeps its own factor
           selection (gates, IBP posterior) private across rounds
  fedavg   dense MLP, every weight shared (plain FedAvg)
  fedprox  fedavg with FedProx's proximal term at the site (kt_core.train, prox_mu)
  local    dense MLP, each site trains alone for the same number of local epochs, nothing shared
and the majority-class floor (each site predicts its most frequent training label).

The federations run through bench.waffle_sim: the coordinator's own `coordinator.strategy.FedAvg`
and kt_core's models, training and evaluation. Accuracy is each site's local test accuracy on its
own classes after the round's aggregation: the global shared state plus, for WAFFLe, the site's
private gates. The whole grid of partitions, sizes and data sets is `python -m bench waffle_grid`.
"""
from __future__ import annotations

import numpy as np

from bench.common import Options, mib, pyplot, say, table
from bench.waffle_grid import OPTIMIZERS, PROX_MU
from bench.waffle_sim import gate_stats, majority_floor, simulate, summary, swap_test
from kt_core.data import PartitionSpec, fashion_mnist_available, load_dataset, site_split
from kt_core.models import ModelConfig

NAME = "waffle"
DESCRIPTION = "WAFFLe vs FedAvg / FedProx / local-only, 10 sites with 2-class shards (in-process simulation)"
N_SITES = 10
QUICK_SITES = 4          # --quick: a smoke test of the comparison, seconds
HIDDEN = (256, 128)
N_FACTORS = ModelConfig().n_factors
METHODS = ("waffle", "fedavg", "fedprox", "local")


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
    train = OPTIMIZERS["sgd"]
    return {"dataset": dataset, "note": note, "max_train": max_train or None,
            "rounds": opts.rounds or (1 if opts.quick else 30), "epochs": opts.epochs or 1,
            "sites": QUICK_SITES if opts.quick else N_SITES, "hidden": list(HIDDEN), "n_factors": N_FACTORS,
            "batch_size": train.batch_size,
            "lr": train.lr, "max_grad_norm": train.max_grad_norm, "optimizer": "sgd, momentum 0.9",
            "prox_mu": PROX_MU, "partition": "shards, 2 classes per site, seed 0"}


def run(opts: Options) -> dict:
    import dataclasses

    import torch

    if opts.grid:
        # `python -m bench waffle --grid`: the whole grid (bench/waffle_grid.py)
        from bench import waffle_grid

        return waffle_grid.run(opts)
    cfg = settings(opts)
    if cfg["note"]:
        say(f"[waffle] NOTE: {cfg['note']}")
    torch.set_num_threads(1)  # small MLPs: one thread is as fast here, and steadier
    data = load_dataset(cfg["dataset"], max_train=cfg["max_train"])
    sites = [f"site-{i:02d}" for i in range(cfg["sites"])]
    spec = PartitionSpec(scheme="shards", classes_per_site=2, seed=0)
    splits = {s: tuple(torch.from_numpy(a) for a in site_split(data, sites, s, spec)) for s in sites}
    say(f"[waffle] {data.name}: {len(data.train_y)} training samples over {cfg['sites']} sites, "
        f"{cfg['rounds']} rounds x {cfg['epochs']} local epoch(s), MLP {list(HIDDEN)}")
    mc = ModelConfig(input_dim=data.input_dim, hidden=HIDDEN, num_classes=data.num_classes, n_factors=N_FACTORS)
    tc = dataclasses.replace(OPTIMIZERS["sgd"], epochs=cfg["epochs"])
    floor = majority_floor(splits)
    out = {"settings": cfg, "site_classes": {s: sorted(set(v[1].tolist())) for s, v in splits.items()},
           "majority_floor": summary(floor), "methods": {}}
    for method in METHODS:
        r = simulate(method, splits, mc, tc, cfg["rounds"], prox_mu=PROX_MU)
        m = {"final": summary(r["accuracy"]), "final_after_local_training": summary(r["accuracy_after_local_training"]),
             "final_per_site": r["accuracy"], "curve_mean": r["curve_mean"], "shared_params": r["shared_params"],
             "bytes_up_per_round_per_site": r["bytes_per_round_per_site"], "wall_s": r["wall_s"]}
        if method == "waffle":
            m["private_gates"] = gate_stats(r["models"], r["initial_gates"])
            m["swap_test"] = swap_test(r["models"], splits, own=r["accuracy"])
        out["methods"][method] = m
        say(f"  {method:<8} {m['final']['mean']:.3f} ± {m['final']['std']:.3f}, {r['wall_s']:.1f} s")
    _report(out, cfg["sites"])
    _plot(out, opts)
    return out


def _report(out: dict, n_sites: int) -> None:
    rows = []
    for method, m in out["methods"].items():
        final, pre = m["final"], m["final_after_local_training"]
        rows.append([method, f"{final['mean']:.4f}", f"{final['std']:.4f}", f"{final['min']:.3f}",
                     f"{pre['mean']:.4f}", f"{m['shared_params']:,}",
                     mib(m["bytes_up_per_round_per_site"]) if m["bytes_up_per_round_per_site"] else "0",
                     f"{m['wall_s']:.1f}"])
    rows.append(["majority", f"{out['majority_floor']['mean']:.4f}", f"{out['majority_floor']['std']:.4f}",
                 f"{out['majority_floor']['min']:.3f}", "-", "-", "-", "-"])
    say(table(["method", "acc mean", "acc std", "min", "acc after local training", "shared params", "up/round/site",
               "wall s"], rows, title=f"\nlocal test accuracy across {n_sites} sites after the last round (after aggregation)"))
    w, f = out["methods"]["waffle"], out["methods"]["fedavg"]
    g, sw = w["private_gates"], w["swap_test"]
    say(f"\nWAFFLe private selection: {g['fraction_on']:.2f} of the gates on (per layer "
        f"{', '.join(f'{v:.2f}' for v in g['fraction_on_per_layer'])}), {g['distinct_patterns']} distinct selections, "
        f"mean pairwise Hamming {g['mean_pairwise_hamming']:.3f}; swap test: a site's own selection scores "
        f"{sw['mean_gain']:+.3f} over the others' on its data (own wins at {sw['own_wins']:.0%} of sites)")
    say(f"bytes per round per site: WAFFLe {mib(w['bytes_up_per_round_per_site'])} vs dense "
        f"{mib(f['bytes_up_per_round_per_site'])} up, the same again down "
        f"({f['bytes_up_per_round_per_site'] / w['bytes_up_per_round_per_site']:.1f}x fewer)")


def _plot(out: dict, opts: Options) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, m in out["methods"].items():
        mean = np.array(m["curve_mean"])
        ax.plot(np.arange(1, len(mean) + 1), mean, marker=".", label=f"{method} ({m['final']['mean']:.3f})")
    ax.axhline(out["majority_floor"]["mean"], color="k", ls=":", lw=1, label="majority floor")
    s = out["settings"]
    ax.set_xlabel("round")
    ax.set_ylabel("local test accuracy (mean over sites)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{s['dataset']}, {s['sites']} sites x 2 classes, {s['epochs']} local epoch(s)/round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    opts.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out / f"{NAME}.png", dpi=110)
    plt.close(fig)
