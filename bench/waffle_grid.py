"""WAFFLe against dense FedAvg, FedProx, local-only and the majority-class floor over a grid of
data sets, partitions, federation sizes and partition seeds, under SGD and Adam.

  python -m bench waffle_grid [--quick]          the whole grid (or a small subset), JSON + PNG + table
  python -m bench.waffle_grid --datasets digits --partitions shards2 dir0.1 --sites 10 --seeds 3
  python -m bench.waffle_grid --datasets digits fashion-mnist --sites 5 10 20 50
                                                 the committed grid: waffle_grid_{digits,fashion}.*

Per cell (data set, partition, sites, optimizer), averaged over the partition seeds: mean, std and
minimum over sites of local test accuracy after the last aggregation, for every method; WAFFLe's
gates on (per layer), pairwise Hamming distance between the sites' selections and the swap test
(own selection vs the others', on the site's data); bytes per round per site. A cell's `misses`
names each of the issue's criteria it fails:
  acc    WAFFLe's mean < max(FedAvg, local-only) - 0.01
  fair   WAFFLe's std over sites > FedAvg's
  floor  some site below its own majority-class floor (ties count as reaching it: a one-class
         site's floor is 1.0)

Every recipe choice (kt_core.factorized's defaults, the IBP concentration among them, FedProx's mu,
the two learning rates) was made on partition seeds 1-3 (validation); the grid reports seeds 10,
11, 12. Each cell runs as one job per seed in `--jobs` spawned worker processes, one torch thread
each, the longest first. Sites that the partition leaves without training or test samples take no
part (the count used is in the JSON).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import shlex
import sys
import time

import numpy as np
import torch

from bench.common import Options, RESULTS, pyplot, say, table, write_json
from bench.waffle_sim import gate_stats, majority_floor, simulate, summary, swap_test
from kt_core.data import PartitionSpec, fashion_mnist_available, load_dataset, site_split
from kt_core.models import ModelConfig
from kt_core.train import TrainConfig

NAME = "waffle_grid"
DESCRIPTION = "WAFFLe vs FedAvg / FedProx / local-only / majority floor over data x partition x sites x seeds"
PARTITIONS = {
    "shards2": PartitionSpec("shards", classes_per_site=2), "shards3": PartitionSpec("shards", classes_per_site=3),
    "dir0.05": PartitionSpec("dirichlet", alpha=0.05), "dir0.1": PartitionSpec("dirichlet", alpha=0.1),
    "dir0.5": PartitionSpec("dirichlet", alpha=0.5), "dir1.0": PartitionSpec("dirichlet", alpha=1.0),
    "quantity": PartitionSpec("quantity", alpha=0.5),
}
SITES = (5, 10, 20, 50)
REPORT_SEEDS = (10, 11, 12)
# one learning rate per optimizer for every method (chosen on the validation seeds)
OPTIMIZERS = {"sgd": TrainConfig(lr=0.05, optimizer="sgd", momentum=0.9, max_grad_norm=1.0, batch_size=64),
              "adam": TrainConfig(lr=3e-3, optimizer="adam", max_grad_norm=1.0, batch_size=64)}
PROX_MU = 1.0   # validation seeds 1-2, digits, 10 sites: Adam 0.874 / 0.891 / 0.909 / 0.933 at 0 / 0.01 / 0.1 / 1; no effect under SGD at 3 steps a round
HIDDEN = (256, 128)
METHODS = ("waffle", "fedavg", "fedprox", "local")
ROUNDS = 30
# Fashion-MNIST before partitioning: 60k samples x the grid would not fit any time budget; at 6k
# its cells took 5/6 of the grid's time (a 784-wide first layer), at 3k the grid fits 2 cores
MAX_TRAIN = {"fashion-mnist": 3000, "digits": None}
SHORT_NAMES = {"digits": "digits", "fashion-mnist": "fashion"}
# data set -> (seconds per site, fixed seconds) of one job (a cell under one seed, SGD), fitted to
# CPU times of every cell on this host (Adam ~10% more); it only orders the jobs
COST_MODEL = {"digits": (0.1, 2.2), "fashion-mnist": (0.13, 7.0)}
# --quick: one cell, one round (a smoke test of the grid, seconds)
QUICK = {"datasets": ["digits"], "partitions": ["shards2"], "sites": [5], "seeds": 1, "optimizers": ["sgd"],
         "rounds": 1}


def _splits(data, n_sites: int, spec: PartitionSpec) -> tuple[dict, int]:
    sites = [f"site-{i:02d}" for i in range(n_sites)]
    out = {}
    for s in sites:
        x, y, tx, ty = site_split(data, sites, s, spec)
        if len(y) and len(ty):
            out[s] = tuple(torch.from_numpy(a) for a in (x, y, tx, ty))
    return out, n_sites - len(out)


def run_seed(data, part: str, n_sites: int, seed: int, opt: str, rounds: int) -> dict:
    """Every method on one cell under one partition seed."""
    splits, dropped = _splits(data, n_sites, dataclasses.replace(PARTITIONS[part], seed=seed))
    mc = ModelConfig(input_dim=data.input_dim, hidden=HIDDEN, num_classes=data.num_classes)
    floor = majority_floor(splits)
    res = {"sites_used": len(splits), "sites_without_data": dropped, "majority": summary(floor)}
    for method in METHODS:
        r = simulate(method, splits, mc, OPTIMIZERS[opt], rounds, prox_mu=PROX_MU, curve=False)
        res[method] = {**summary(r["accuracy"]), "after_local_training": summary(r["accuracy_after_local_training"])["mean"],
                       "below_floor": int(sum(r["accuracy"][s] < floor[s] - 1e-9 for s in splits)),
                       "bytes_per_round_per_site": r["bytes_per_round_per_site"], "wall_s": r["wall_s"]}
        if method == "waffle":
            res["gates"] = gate_stats(r["models"], r["initial_gates"])
            res["swap"] = swap_test(r["models"], splits, own=r["accuracy"])
    return res


def run_cell(data, part: str, n_sites: int, seeds, opt: str, rounds: int) -> dict:
    """Every method on one cell, once per partition seed; statistics averaged over the seeds."""
    return _average([run_seed(data, part, n_sites, seed, opt, rounds) for seed in seeds])


def _average(per_seed: list[dict]) -> dict:
    def mean_of(*path):
        vals = []
        for r in per_seed:
            v = r
            for k in path:
                v = v[k]
            vals.append(v)
        return np.mean(vals, axis=0).tolist() if isinstance(vals[0], list) else float(np.mean(vals))

    cell = {"seeds": per_seed, "majority": mean_of("majority", "mean"), "sites_used": mean_of("sites_used")}
    for m in METHODS:
        cell[m] = {k: mean_of(m, k) for k in ("mean", "std", "min", "after_local_training", "below_floor")}
        cell[m]["bytes_per_round_per_site"] = per_seed[0][m]["bytes_per_round_per_site"]
    cell["gates"] = {k: mean_of("gates", k) for k in ("fraction_on", "fraction_on_per_layer", "mean_pairwise_hamming")}
    cell["swap_gain"] = mean_of("swap", "mean_gain")
    w, f, loc = cell["waffle"], cell["fedavg"], cell["local"]
    misses = []
    if w["mean"] < max(f["mean"], loc["mean"]) - 0.01:
        misses.append("acc")
    if w["std"] > f["std"]:
        misses.append("fair")
    if w["below_floor"] > 0:
        misses.append("floor")
    cell["misses"] = misses
    return cell


_DATA: dict = {}


def _seed_job(ds_name: str, part: str, n: int, seed: int, opt: str, rounds: int) -> dict:
    """One cell under one partition seed in a worker process: plain arguments in, a JSON-able dict
    out (no model crosses). A job per seed rather than per cell: the last jobs of the grid are a
    third as long, so the two workers finish closer together."""
    torch.set_num_threads(1)   # small MLPs: one thread per process, a process per core
    if ds_name not in _DATA:
        _DATA[ds_name] = load_dataset(ds_name, max_train=MAX_TRAIN[ds_name])
    t0 = time.monotonic()
    res = run_seed(_DATA[ds_name], part, n, seed, opt, rounds)
    return {**res, "wall_s": time.monotonic() - t0}


def _cost(job) -> float:
    # longest first, so that the workers finish together
    ds, _part, n, _seed, opt, _rounds = job
    per_site, fixed = COST_MODEL[ds]
    return (fixed + per_site * n) * (1.1 if opt == "adam" else 1.0)


def _jobs(datasets, partitions, sites, seeds, optimizers, rounds) -> list[tuple]:
    todo = []
    for ds_name in datasets:
        if ds_name == "fashion-mnist" and not fashion_mnist_available():
            say("[waffle_grid] Fashion-MNIST is not installed (apt install dataset-fashion-mnist): skipped")
            continue
        todo += [(ds_name, part, n, seed, opt, rounds)
                 for part, n, opt, seed in itertools.product(partitions, sites, optimizers, seeds)]
    return sorted(todo, key=_cost, reverse=True)


def run_grid(datasets, partitions, sites, seeds, optimizers, rounds, out=RESULTS, name=NAME, jobs=2,
             command: str | None = None) -> dict:
    """The grid in `jobs` worker processes; with more than one data set each also gets its own
    `<name>_<data>.json` and `.png` (digits, fashion)."""
    started, load_start = time.monotonic(), os.getloadavg()[0]
    todo, seeds = _jobs(datasets, partitions, sites, seeds, optimizers, rounds), list(seeds)
    done: dict[tuple, list] = {}
    cells = []
    # spawn, not fork: a forked torch can deadlock on its thread pools
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(todo) or 1)), mp_context=ctx) as pool:
        futures = {pool.submit(_seed_job, *job): job for job in todo}
        for fut in concurrent.futures.as_completed(futures):
            ds_name, part, n, seed, opt, _ = futures[fut]
            key = (ds_name, part, n, opt)
            done.setdefault(key, []).append((seed, fut.result()))
            if len(done[key]) < len(seeds):
                continue
            per_seed = [r for _, r in sorted(done.pop(key), key=lambda sr: seeds.index(sr[0]))]
            cell = {"dataset": ds_name, "partition": part, "sites": n, "optimizer": opt,
                    "wall_s": sum(r["wall_s"] for r in per_seed), **_average(per_seed)}
            cells.append(cell)
            say(f"  {ds_name} {part} {n} sites {opt} ({cell['wall_s']:.0f} s over {len(seeds)} seeds):\n"
                + render([cell]).splitlines()[-1])
            # a long grid keeps what it has: the cells so far, rewritten after each one
            write_json(out, f"{name}.partial", {"cells": cells})
    cells.sort(key=lambda c: (datasets.index(c["dataset"]), list(PARTITIONS).index(c["partition"]), c["sites"],
                              list(OPTIMIZERS).index(c["optimizer"])))
    settings = {"rounds": rounds, "epochs": 1, "seeds": seeds, "hidden": list(HIDDEN), "prox_mu": PROX_MU,
                "optimizers": {k: dataclasses.asdict(v) for k, v in OPTIMIZERS.items()}, "max_train": MAX_TRAIN,
                "jobs": jobs}
    # the host is shared: how busy it was says what the wall time means
    result = {"command": command, "settings": settings, "cells": cells, "wall_s": time.monotonic() - started,
              "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}}
    say(render(cells))
    by_data = sorted({c["dataset"] for c in cells}, key=datasets.index)
    if len(by_data) > 1:
        for ds_name in by_data:
            own = f"{name}_{SHORT_NAMES[ds_name]}"
            write_json(out, own, {"benchmark": NAME, **result, "cells": [c for c in cells if c["dataset"] == ds_name]})
            _plot([c for c in cells if c["dataset"] == ds_name], out, own)
    else:
        _plot(cells, out, name)
    (out / f"{name}.partial.json").unlink(missing_ok=True)
    return result


def render(cells: list[dict]) -> str:
    rows = []
    for c in cells:
        w, f, p, loc = (c[m] for m in METHODS)
        rows.append([c["dataset"], c["partition"], c["sites"], c["optimizer"],
                     f"{w['mean']:.3f}±{w['std']:.3f} ({w['min']:.2f})", f"{f['mean']:.3f}±{f['std']:.3f} ({f['min']:.2f})",
                     f"{p['mean']:.3f}", f"{loc['mean']:.3f}±{loc['std']:.3f}", f"{c['majority']:.3f}",
                     "/".join(f"{v:.2f}" for v in c["gates"]["fraction_on_per_layer"]),
                     f"{c['gates']['mean_pairwise_hamming']:.2f}", f"{c['swap_gain']:+.3f}",
                     f"{f['bytes_per_round_per_site'] / max(w['bytes_per_round_per_site'], 1):.1f}x",
                     ",".join(c["misses"]) or "-"])
    return table(["data", "partition", "sites", "opt", "waffle mean±std (min)", "fedavg mean±std (min)", "fedprox",
                  "local mean±std", "majority", "gates on/layer", "hamming", "swap gain", "dense/waffle bytes", "misses"],
                 rows, title="\nlocal test accuracy after the last aggregation, mean over partition seeds")


def _plot(cells: list[dict], out, name: str) -> None:
    if not cells:
        return
    plt = pyplot()
    groups = sorted({(c["dataset"], c["optimizer"]) for c in cells})
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6, 0.5 * len(cells) / len(groups) + 3), 3.2 * len(groups)),
                             squeeze=False)
    for ax, (ds, opt) in zip(axes[:, 0], groups):
        cs = [c for c in cells if c["dataset"] == ds and c["optimizer"] == opt]
        x = np.arange(len(cs))
        for k, m in enumerate(METHODS):
            ax.bar(x + (k - 1.5) * 0.18, [c[m]["mean"] for c in cs], 0.18, yerr=[c[m]["std"] for c in cs],
                   label=m, capsize=1.5)
        ax.scatter(x, [c["majority"] for c in cs], marker="_", s=200, color="k", label="majority floor", zorder=3)
        ax.set_xticks(x, [f"{c['partition']}\n{c['sites']}" for c in cs], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{ds}, {opt}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=5)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)


def run(opts: Options) -> dict:
    q = QUICK if opts.quick else {"datasets": ["fashion-mnist", "digits"], "partitions": list(PARTITIONS),
                                  "sites": list(SITES), "seeds": len(REPORT_SEEDS), "optimizers": list(OPTIMIZERS),
                                  "rounds": ROUNDS}
    datasets = [opts.dataset] if opts.dataset != "auto" else q["datasets"]
    return run_grid(datasets, q["partitions"], q["sites"], REPORT_SEEDS[:q["seeds"]], q["optimizers"],
                    opts.rounds or q["rounds"], out=opts.out, command=shlex.join(["python", "-m", "bench", *sys.argv[1:]]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.waffle_grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["digits"], choices=["fashion-mnist", "digits"])
    ap.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    ap.add_argument("--sites", nargs="+", type=int, default=[10])
    ap.add_argument("--seeds", type=int, default=len(REPORT_SEEDS), choices=range(1, len(REPORT_SEEDS) + 1))
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--name", default=NAME, help="results file name under bench/results")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, one cell each at a time")
    a = ap.parse_args(argv)
    command = shlex.join(["python", "-m", "bench.waffle_grid", *(sys.argv[1:] if argv is None else argv)])
    data = run_grid(a.datasets, a.partitions, a.sites, REPORT_SEEDS[:a.seeds], a.optimizers, a.rounds, name=a.name,
                    jobs=a.jobs, command=command)
    if len(set(a.datasets)) == 1:   # several: run_grid wrote one file per data set
        write_json(RESULTS, a.name, {"benchmark": NAME, **data})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
