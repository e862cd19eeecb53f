"""The federated setting the attacks run against: data, models, and what one site sends.

A site holds a few digit images (sklearn digits, 8x8) and trains from the global model; the
attacker (the coordinator) sees what leaves the site under each condition:

    dense-1step      one full-batch gradient step of a dense MLP (FedSGD): the attacker's best case
    dense-multistep  several local epochs of minibatch SGD (FedAvg): the update mixes many steps
    factorized       one step of the WAFFLe model: only the shared factors' update leaves the site;
                     the factor selection (gates) stays private
    dp               one DP-SGD step: each record's gradient clipped, Gaussian noise added
    secagg           the attacker sees only the sample-weighted sum of several sites' updates
    dp+secagg        both

Record-level DP here is the real mechanism (per-record clipping, noise std sigma * C on the sum),
written directly in torch so the canaries' gradients can be placed exactly; its epsilon comes from
the project's accountant, supplied by the caller (kt_core does not import security).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from kt_core.data import load_dataset
from kt_core.factorized import FactorizedLinear
from kt_core.manifest import manifest_of
from kt_core.models import ModelConfig, build_model


@dataclass(frozen=True)
class Condition:
    name: str
    description: str
    model: str = "dense"            # dense | factorized
    epochs: int = 1
    batches: int = 1                # minibatches per epoch (1: one full-batch step per epoch)
    noise_multiplier: float = 0.0   # > 0: DP-SGD with per-record clipping to clip_norm
    clip_norm: float = 1.0
    sites: int = 1                  # > 1: the attacker sees only the sum over this many sites

    @property
    def dp(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def steps(self) -> int:
        return self.epochs * self.batches


CONDITIONS = (
    Condition("dense-1step", "dense MLP, one full-batch gradient step (FedSGD)"),
    Condition("dense-multistep", "dense MLP, 5 local epochs of 4 minibatches (FedAvg)", epochs=5, batches=4),
    Condition("factorized", "WAFFLe model, one step; only shared factors leave, gates private", model="factorized"),
    Condition("dp", "dense MLP, one DP-SGD step (clip 1, noise multiplier 1)", noise_multiplier=1.0),
    Condition("secagg", "dense MLP, one step; attacker sees the SecAgg sum of 3 sites", sites=3),
    Condition("dp+secagg", "DP-SGD step at each of 3 sites; attacker sees the SecAgg sum",
              noise_multiplier=1.0, sites=3),
)


@dataclass
class Splits:
    """Disjoint parts of the digits data: public (warms up the global model), each site's records,
    and non-members (never trained on), as float32 (n, 64) in [0, 1] with int64 labels."""
    public: tuple[Tensor, Tensor]
    sites: list[tuple[Tensor, Tensor]]
    nonmembers: tuple[Tensor, Tensor]


def make_splits(seed: int, n_sites: int, per_site: int, nonmembers: int, public: int = 400) -> Splits:
    ds = load_dataset("digits")
    x = torch.from_numpy(np.concatenate([ds.train_x, ds.test_x]))
    y = torch.from_numpy(np.concatenate([ds.train_y, ds.test_y]))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    need = public + n_sites * per_site + nonmembers
    if need > len(y):
        raise ValueError(f"the digits data has {len(y)} images, the experiment needs {need}")
    parts, start = [], 0
    for size in [public] + [per_site] * n_sites + [nonmembers]:
        idx = order[start:start + size]
        parts.append((x[idx], y[idx]))
        start += size
    return Splits(parts[0], parts[1:-1], parts[-1])


def build(kind: str, seed: int, hidden: int = 32, n_factors: int = 8) -> nn.Module:
    adapter = {"dense": "dense", "factorized": "waffle"}[kind]
    return build_model(ModelConfig(adapter=adapter, input_dim=64, hidden=(hidden,), num_classes=10,
                                   n_factors=n_factors, seed=seed))


def warm_up(model: nn.Module, data: tuple[Tensor, Tensor], epochs: int, lr: float, seed: int) -> nn.Module:
    """A few epochs on public data: the global model of a federation a few rounds in."""
    gen = torch.Generator().manual_seed(seed)
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def shared_names(model: nn.Module) -> list[str]:
    return sorted(manifest_of(model).shared_names())


def flatten(update: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([update[n].reshape(-1).double() for n in names])


def unflatten(vector: Tensor, like: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    out, start = {}, 0
    for n in names:
        size = like[n].numel()
        out[n] = vector[start:start + size].reshape(like[n].shape).to(like[n].dtype)
        start += size
    return out


@dataclass
class Canaries:
    """Gradient-space ("Dirac") canaries: canary j is a record whose gradient is -norm * e_{coords[j]}
    on the flattened shared update, so training moves that one coordinate up. Only the canaries with
    included[j] are in the site's data."""
    coords: Tensor          # (m,) indices into the flattened shared update
    included: Tensor        # (m,) bool
    norm: float = 1.0


def local_update(global_model: nn.Module, data: tuple[Tensor, Tensor], cond: Condition, lr: float,
                 gen: torch.Generator, canaries: Canaries | None = None) -> dict[str, Tensor]:
    """Train a copy of the global model on the site's `data` under `cond`; return the update of
    the shared tensors (after - before), which is what leaves the site."""
    model = copy.deepcopy(global_model).train()
    params = dict(model.named_parameters())
    names = shared_names(model)
    before = {n: params[n].detach().clone() for n in names}
    x, y = data
    n_data = len(y)
    n_canary = int(canaries.included.sum()) if canaries is not None else 0
    canary_coords = canaries.coords[canaries.included] if canaries is not None else torch.zeros(0, dtype=torch.long)
    # records 0..n_data-1 are images, n_data.. are the included canaries; the normalisation uses the
    # expected batch size of the real data only (a public constant, as in DP-SGD)
    expected_batch = n_data / cond.batches
    for _ in range(cond.epochs):
        order = torch.randperm(n_data + n_canary, generator=gen)
        for chunk in order.chunk(cond.batches):
            rows, cans = chunk[chunk < n_data], chunk[chunk >= n_data] - n_data
            grads = _summed_grads(model, params, x[rows], y[rows], cond)
            flat_extra = torch.zeros(sum(params[n].numel() for n in names), dtype=torch.float64)
            if len(cans):
                # a canary is a record like any other: under DP its gradient is clipped too
                size = min(canaries.norm, cond.clip_norm) if cond.dp else canaries.norm
                flat_extra.index_add_(0, canary_coords[cans], torch.full((len(cans),), -size, dtype=torch.float64))
            extra = unflatten(flat_extra, params, names)
            with torch.no_grad():
                for n, p in params.items():
                    g = grads[n] + (extra[n] if n in extra else 0)
                    if cond.dp:
                        g = g + torch.randn(p.shape, generator=gen) * (cond.noise_multiplier * cond.clip_norm)
                    p -= lr * g / expected_batch
    return {n: (params[n].detach() - before[n]) for n in names}


def _summed_grads(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor,
                  cond: Condition) -> dict[str, Tensor]:
    """Sum over the records of their loss gradients; with DP each record's gradient is clipped to
    cond.clip_norm (all parameters together) first."""
    if len(y) == 0:
        return {n: torch.zeros_like(p) for n, p in params.items()}
    if not cond.dp:
        loss = F.cross_entropy(model(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        # parameters the data loss never touches (WAFFLe's stick-breaking ones) get no gradient
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
    if any(isinstance(m, FactorizedLinear) for m in model.modules()):
        raise ValueError("the DP conditions use the dense model (per-record gradients through random gates "
                         "are not modelled here)")
    detached = {n: p.detach() for n, p in params.items()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per = vmap(grad(one), in_dims=(None, 0, 0))(detached, x, y)
    norms = torch.sqrt(sum(g.reshape(len(y), -1).pow(2).sum(1) for g in per.values()))
    scale = (cond.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return {n: (g * scale.view(-1, *([1] * (g.dim() - 1)))).sum(0) for n, g in per.items()}


# ---------------------------------------------------------------- what the attacker can compute

def inferred_gates(model: nn.Module, update: dict[str, Tensor]) -> dict[str, Tensor]:
    """For each factorized layer, the factors the site used: those whose shared rows moved at all.
    (An inactive factor gets exactly zero gradient, so a single-step update gives them away.)"""
    gates = {}
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            moved = (update[f"{name}.w_b"].abs().amax(1) > 0) | (update[f"{name}.w_a"].abs().amax(0) > 0) \
                | (update[f"{name}.r"].abs() > 0)
            gates[f"{name}.gate_logits"] = torch.where(moved, 1.0, -1.0)
    return gates


def attacker_forward(model: nn.Module, gates: dict[str, Tensor]):
    """forward(x, shared_params) of the model as the attacker can evaluate it: the global model with
    the given shared tensors and, for factorized layers, the inferred gates (eval mode: hard gates)."""
    frozen = copy.deepcopy(model).eval()
    fixed = {n: p.detach() for n, p in frozen.named_parameters()}
    fixed.update(gates)

    def forward(x: Tensor, shared: dict[str, Tensor]) -> Tensor:
        return functional_call(frozen, {**fixed, **shared}, (x,))

    return forward


def per_record_loss(forward, shared: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> np.ndarray:
    with torch.no_grad():
        x, y = data
        return F.cross_entropy(forward(x, shared), y, reduction="none").numpy()
