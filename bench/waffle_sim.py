"""In-process federations for the WAFFLe benchmarks, through the product's own code.

Aggregation is the coordinator's `coordinator.strategy.FedAvg` (updates = deltas of the shared
state, weighted by sample count); models, training (FedProx's proximal term included) and
evaluation are kt_core's. Accuracy is each site's local test accuracy on its own label mix (its
`site_split` test part) after the round's aggregation: the global shared state plus, for WAFFLe,
the site's private factor selection.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import numpy as np
import torch

from coordinator.strategy import FedAvg
from kt_core.factorized import FactorizedLinear
from kt_core.manifest import manifest_of
from kt_core.models import ModelConfig, build_model, shared_state
from kt_core.site_optimizer import SiteOptimizer
from kt_core.train import TrainConfig, evaluate, train_local

# method -> (adapter mode, federated); FedProx is FedAvg with TrainConfig.prox_mu > 0
METHODS = {"waffle": ("waffle", True), "fedavg": ("dense", True), "fedprox": ("dense", True),
           "local": ("dense", False)}


def fedavg_mean(states: list[Mapping[str, torch.Tensor]], weights: list[int],
                start: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of the sites' shared states, computed by the coordinator's FedAvg
    from their deltas to `start` (the round's global state; the first site's state if None).

    The tensors of a state travel to FedAvg packed end to end, one flat array per dtype: FedAvg is
    elementwise (float64 sums, one cast at the end), so the mean is bit for bit the per-tensor one,
    and FedAvg's per-tensor checks (a typing.Protocol isinstance each, ~5 us) run once per site
    instead of once per tensor (fedavg_mean ~10% of a 50-site cell before)."""
    ref_state = start or states[0]
    layout = _packing(ref_state)
    ref = _pack(ref_state, layout)
    strategy = FedAvg()
    strategy.begin(ref)
    for state, weight in zip(states, weights, strict=True):
        strategy.add(_pack(state, layout, minus=ref), int(weight))
    out = strategy.finish()
    return {n: torch.from_numpy(np.array(out[key][a:b]).reshape(shape))
            for n, (key, a, b, shape) in layout.items()}


def _packing(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """name -> (flat array key, start, end, shape): the tensors of each dtype end to end, in name order."""
    ends: dict[str, int] = {}
    layout = {}
    for n in sorted(state):
        t = state[n]
        key = str(t.dtype).removeprefix("torch.")
        a = ends.get(key, 0)
        ends[key] = a + t.numel()
        layout[n] = (key, a, ends[key], tuple(t.shape))
    return layout


def _pack(state: Mapping[str, torch.Tensor], layout: dict[str, tuple],
          minus: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    if set(state) != set(layout):
        raise ValueError(f"state tensors {sorted(state)} differ from the global state's {sorted(layout)}")
    sizes: dict[str, tuple] = {}
    for n, (key, _a, b, _shape) in layout.items():
        sizes[key] = (max(b, sizes.get(key, (0,))[0]), state[n].dtype)
    flat = {key: torch.empty(size, dtype=dtype).numpy() for key, (size, dtype) in sizes.items()}
    for n, (key, a, b, shape) in layout.items():
        t = state[n].detach().cpu()
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {n!r}: shape {list(t.shape)}, expected {list(shape)}")
        src = t.reshape(-1).numpy()
        if minus is None:
            flat[key][a:b] = src
        else:
            np.subtract(src, minus[key][a:b], out=flat[key][a:b])
    return flat


def majority_floor(splits: Mapping[str, tuple]) -> dict[str, float]:
    """Each site's accuracy when it predicts its own most frequent training label."""
    floor = {}
    for site, (_, y, _, ty) in splits.items():
        top = int(np.bincount(np.asarray(y), minlength=int(max(y.max(), ty.max())) + 1).argmax())
        floor[site] = float((np.asarray(ty) == top).mean())
    return floor


def _waffle_layers(model) -> list[FactorizedLinear]:
    return [m for m in model.modules() if isinstance(m, FactorizedLinear)]


class _SharedView:
    """A model's SHARED tensors by name, looked up once (the manifest walk and the strict checks of
    kt_core.models.load_shared_state cost ~0.5 ms a call, 7% of a grid cell, and the states moved
    here are the simulation's own aggregates)."""

    def __init__(self, model: torch.nn.Module):
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        self.tensors = {n: tensors[n] for n in shared_state(model)}

    def get(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.tensors.items()}

    @torch.no_grad()
    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        for n, t in self.tensors.items():
            t.copy_(state[n])


def simulate(method: str, splits: Mapping[str, tuple], model_cfg: ModelConfig, train_cfg: TrainConfig,
             rounds: int, prox_mu: float = 0.0, curve: bool = True) -> dict:
    """`rounds` rounds of `method` over the sites of `splits` (site -> train x, y, test x, y
    tensors). Returns per-site accuracies after the last aggregation and after local training,
    the models, and wall time; with `curve` also the mean accuracy after every round (else only
    the last round is evaluated)."""
    mode, federated = METHODS[method]
    started = time.monotonic()
    sites = list(splits)
    cfg = dataclasses.replace(model_cfg, adapter=mode)
    models = {s: build_model(cfg) for s in sites}
    views = {s: _SharedView(m) for s, m in models.items()}
    # each site keeps its optimizer across rounds, as a participant does (kt_core.site_optimizer)
    optimizers = {s: SiteOptimizer(m) for s, m in models.items()}
    initial = {s: [m.gate_logits.detach().clone() for m in _waffle_layers(mod)] for s, mod in models.items()}
    tc = dataclasses.replace(train_cfg, prox_mu=prox_mu if method == "fedprox" else 0.0)
    global_state = views[sites[0]].get()
    for site in sites:
        views[site].load(global_state)
    means, pre, post = [], {}, {}
    for rnd in range(1, rounds + 1):
        scored = curve or rnd == rounds
        states, weights = [], []
        for i, site in enumerate(sites):
            x, y, tx, ty = splits[site]
            # the site's model holds the global shared state (loaded after the last aggregation)
            cfg_i = dataclasses.replace(tc, seed=rnd * 1000 + i)
            train_local(models[site], x, y, cfg_i, optimizer=optimizers[site].for_round(cfg_i))
            if scored:
                pre[site] = evaluate(models[site], tx, ty)["accuracy"]
            if federated:
                # the live tensors, not a copy: nothing touches this site's model before the
                # aggregation below has read them
                states.append(views[site].tensors)
                weights.append(len(y))
        if federated:
            global_state = fedavg_mean(states, weights, start=global_state)
            for site in sites:
                views[site].load(global_state)
        if scored:
            # without aggregation a site's model is the one just scored after local training
            post = ({s: evaluate(models[s], splits[s][2], splits[s][3])["accuracy"] for s in sites}
                    if federated else dict(pre))
            means.append(float(np.mean(list(post.values()))))
    manifest = manifest_of(models[sites[0]])
    return {"method": method, "accuracy": post, "accuracy_after_local_training": pre, "curve_mean": means,
            "bytes_per_round_per_site": manifest.shared_nbytes() if federated else 0,
            "shared_params": manifest.shared_numel() if federated else 0,
            "models": models, "initial_gates": initial, "wall_s": time.monotonic() - started}


def gate_stats(models: Mapping[str, torch.nn.Module], initial: Mapping[str, list] | None = None) -> dict:
    """The sites' private selections at the posterior mode: fraction on per layer, pairwise
    Hamming distance (0 = identical), distinct patterns, and how far the logits moved."""
    patterns, per_layer, moved = [], [], []
    for site, model in models.items():
        layers = _waffle_layers(model)
        on = [m.mode_gates().numpy() for m in layers]
        per_layer.append([float(v.mean()) for v in on])
        patterns.append(np.concatenate(on))
        if initial is not None:
            moved += [float((m.gate_logits.detach() - g0).abs().mean()) for m, g0 in zip(layers, initial[site])]
    p = np.stack(patterns)
    ham = [float(np.mean(p[i] != p[j])) for i in range(len(p)) for j in range(i + 1, len(p))]
    return {"fraction_on": float(p.mean()), "fraction_on_per_layer": np.mean(per_layer, axis=0).tolist(),
            "mean_pairwise_hamming": float(np.mean(ham)) if ham else 0.0,
            "distinct_patterns": len({tuple(v) for v in p.tolist()}),
            "mean_abs_logit_change": float(np.mean(moved)) if moved else 0.0}


def swap_test(models: Mapping[str, torch.nn.Module], splits: Mapping[str, tuple], max_others: int = 9,
              own: Mapping[str, float] | None = None) -> dict:
    """Each site's test accuracy with its own selection minus the mean over other sites'
    selections (same shared dictionary): > 0 means the private selection carries what its data
    needs. Returns the mean gain over sites and the fraction of sites whose own selection wins.
    The others are the next `max_others` sites in order (all of them up to 10 sites): the full
    test is sites^2 evaluations, 2500 at 50 sites, a fifth of such a cell's time. `own`: each
    site's accuracy with its own selection where already known (simulate's "accuracy")."""
    sites = list(models)
    if len(sites) < 2:
        return {"mean_gain": 0.0, "own_wins": 0.0}
    own_logits = {s: [m.gate_logits.detach().clone() for m in _waffle_layers(models[s])] for s in sites}
    gains = []
    for s in sites:
        model, (_, _, tx, ty) = models[s], splits[s]
        mine = own[s] if own is not None else evaluate(model, tx, ty)["accuracy"]
        others = []
        k = sites.index(s)
        for o in [sites[(k + j) % len(sites)] for j in range(1, min(len(sites), max_others + 1))]:
            with torch.no_grad():
                for m, g in zip(_waffle_layers(model), own_logits[o]):
                    m.gate_logits.copy_(g)
            others.append(evaluate(model, tx, ty)["accuracy"])
        with torch.no_grad():
            for m, g in zip(_waffle_layers(model), own_logits[s]):
                m.gate_logits.copy_(g)
        gains.append(mine - float(np.mean(others)))
    return {"mean_gain": float(np.mean(gains)), "own_wins": float(np.mean([g > 0 for g in gains]))}


def summary(values: Mapping[str, float]) -> dict:
    a = np.asarray(list(values.values()), dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}
