"""The local training recipe: a plain loop minimizing the per-sample negative ELBO.

    loss = cross_entropy(batch) + kl_weight * KL(q || prior) / num_samples

The KL term is the whole model's (zero for the non-Bayesian adapters), spread over the local data
set so that one epoch of mini-batches adds up to one ELBO.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.manifest import Role, manifest_of
from kt_core.models import kl_terms, sum_terms

OPTIMIZERS = ("sgd", "adam")
# far above any recipe here (the demos take 2 epochs of batch 32-64) and low enough that a run
# config cannot keep a site training for days in one round or allocate a batch without bound
TRAIN_LIMITS = {"epochs": 1000, "batch_size": 1 << 16, "max_steps": 10_000_000}   # epochs: without max_steps


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"          # sgd | adam
    momentum: float = 0.9
    kl_weight: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    # global gradient-norm clip (None = off). On by default: products of factors (WAFFLe, LoRA)
    # under momentum SGD can diverge at learning rates a dense layer takes, and WAFFLe's dictionary
    # steps at FactorizedLinear.DICT_LR_SCALE times lr (without the clip the 64-256-128-10 digits
    # MLP, factors from scratch, went NaN at x3 under SGD 0.05; with it x4 trained best there, x8
    # on the seeded base)
    max_grad_norm: float | None = 1.0
    # FedProx (Li et al. 2020): mu / 2 * ||w - w_round_start||^2 over the SHARED tensors is added to
    # every step's loss, pulling a site's update towards the global model it started from; 0 = off
    prox_mu: float = 0.0
    # a site keeps its optimizer's state (momentum, Adam moments) from round to round, as it keeps
    # its private factors (kt_core.site_optimizer: why, and what it measured); False = a fresh
    # optimizer every round
    keep_optimizer_state: bool = True

    def validate(self) -> None:
        def pos_int(name, limit: int | None = None):
            v = getattr(self, name)
            limit = limit or TRAIN_LIMITS[name]
            # bounded: a coordinator the site need not trust sets these, and each is a site's compute
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
                raise ValueError(f"{name}: must be an integer between 1 and {limit}"
                                 f"{' (or set max_steps)' if name == 'epochs' else ''}, got {v!r}")

        def number(name, lo, lo_open, hi=math.inf):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and v < hi
            if not ok:
                raise ValueError(f"{name}: must be a finite number {'>' if lo_open else '>='} {lo}"
                                 f"{f' and < {hi}' if hi != math.inf else ''}, got {v!r}")

        # with max_steps set it bounds the work, and "epochs = 10**6" means "as many as it takes"
        pos_int("epochs", limit=2**62 if self.max_steps is not None else None)
        pos_int("batch_size")
        number("lr", 0, lo_open=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        number("momentum", 0, lo_open=False, hi=1)
        number("kl_weight", 0, lo_open=False)
        if self.max_steps is not None:
            pos_int("max_steps")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {self.seed!r}")
        if self.max_grad_norm is not None:
            number("max_grad_norm", 0, lo_open=True)
        number("prox_mu", 0, lo_open=False)
        if not isinstance(self.keep_optimizer_state, bool):
            raise ValueError(f"keep_optimizer_state: must be true or false, got {self.keep_optimizer_state!r}")


@dataclass
class TrainResult:
    num_samples: int
    steps: int
    loss: float         # mean training loss over the steps taken
    seconds: float


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return make_optimizer_for([p for p in model.parameters() if p.requires_grad], cfg)


def param_groups(params: list[nn.Parameter], lr: float, optimizer: str = "adam") -> list[dict]:
    """One optimizer group per learning rate: a parameter that carries a scale (the WAFFLe
    adapters' dictionary and private parameters, kt_core.factorized.ScaledLRParameter) gets
    lr times its scale for this optimizer; the rest get lr."""
    by_scale: dict[float, list[nn.Parameter]] = {}
    for p in params:
        scale = p.scale_for(optimizer) if hasattr(p, "scale_for") else 1.0
        by_scale.setdefault(float(scale), []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in sorted(by_scale.items())]


def make_optimizer_for(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over `params` (DP-SGD splits the parameters over two of them)."""
    params = list(params)
    groups = param_groups(params, cfg.lr, cfg.optimizer) or [{"params": []}]
    # fused (one kernel per group) where torch has it, else foreach (one call per operation and
    # group): torch picks neither on CPU, and its per-tensor Python loop was ~15% of a WAFFLe step;
    # fused over foreach: Adam on the 784-256-128-10 MLP 0.31 -> 0.12 ms a step, SGD 0.09 -> 0.05
    kind = {"fused": True} if _fusable(params) else {"foreach": True}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **kind)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kind)


def _fusable(params: list[nn.Parameter]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def with_kl(model: nn.Module, loss: Tensor, num_samples: int, kl_weight: float) -> Tensor:
    """A batch's data loss plus the site's share of the KL term: the per-site ELBO per record."""
    # a model without Bayesian adapters has no KL term at all: no zero to add and differentiate
    terms = kl_terms(model) if kl_weight else []
    if terms:
        loss = loss + kl_weight * sum_terms(terms).to(loss.device) / num_samples
    return loss


def elbo_loss(model: nn.Module, logits: Tensor, y: Tensor, num_samples: int, kl_weight: float) -> Tensor:
    return with_kl(model, F.cross_entropy(logits, y), num_samples, kl_weight)


def _as_tensors(x, y) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y, dtype=torch.int64)
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be N x ... and y of length N, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no samples")
    return x, y


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model that has none)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_local(model: nn.Module, x, y, cfg: TrainConfig,
                progress: Callable[[int, float], None] | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """Train in place on (x, y). See `train_steps`."""
    x, y = _as_tensors(x, y)
    n = x.shape[0]
    device = device_of(model)

    def batch_loss(idx: Tensor) -> Tensor:
        # index_select, not x[idx]: the same rows, without advanced indexing's set-up (17 -> 4 us)
        xb, yb = x.index_select(0, idx).to(device), y.index_select(0, idx).to(device)
        return elbo_loss(model, model(xb), yb, n, cfg.kl_weight)

    return train_steps(model, n, batch_loss, cfg, progress, optimizer)


def train_steps(model: nn.Module, n: int, batch_loss: Callable[[Tensor], Tensor], cfg: TrainConfig,
                progress: Callable[[int, float], None] | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """The training loop every task shares: `cfg.epochs` shuffled passes over n samples (at most
    `cfg.max_steps` steps), `batch_loss(indices)` giving each batch's loss. Deterministic given
    cfg.seed: batch order and the adapters' gate and stick-breaking samples come from an RNG
    seeded here, and the caller's global RNG is left as it was. `progress(step, loss)` is called
    after every step."""
    cfg.validate()
    device = device_of(model)
    # DP-SGD hands in its own (security.dp.engine: clipping and noise happen in its step), a site
    # the one it keeps from round to round (kt_core.site_optimizer)
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
    clip = _grad_clipper(list(model.parameters()), cfg.max_grad_norm)
    if cfg.prox_mu:
        batch_loss = _with_proximal_term(model, batch_loss, cfg.prox_mu)
    was_training = model.training
    _set_mode(model, True)
    steps, loss_sum = 0, 0.0
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        if device.type == "cpu":
            # the CPU generator alone: torch.manual_seed also queues a lazy seed for every
            # accelerator back end, formatting a stack trace each time (~0.9 ms a call, ~10% of
            # a WAFFLe grid cell where a site takes 1-3 steps a round)
            torch.default_generator.manual_seed(cfg.seed)
        else:
            torch.manual_seed(cfg.seed)
        order_rng = torch.Generator().manual_seed(cfg.seed)
        for _epoch in range(cfg.epochs):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
            perm = torch.randperm(n, generator=order_rng)
            for i in range(0, n, cfg.batch_size):
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    break
                loss = batch_loss(perm[i:i + cfg.batch_size])
                value = loss.item()
                if not math.isfinite(value):
                    # a diverged update must never reach the aggregate
                    raise FloatingPointError(f"training loss became {value} at step {steps}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip()
                optimizer.step()
                steps += 1
                loss_sum += value
                if progress is not None:
                    progress(steps, value)
    _set_mode(model, was_training)
    return TrainResult(num_samples=n, steps=steps, loss=loss_sum / max(steps, 1),
                       seconds=time.perf_counter() - start)


def _set_mode(model: nn.Module, training: bool) -> None:
    """model.train(training), which sets the flag on every module through nn.Module.__setattr__
    (~8 us for the MLP, twice a train_local call), only where some module is in the other mode."""
    if any(m.training != training for m in model.modules()):
        model.train(training)


def _grad_clipper(params: list[nn.Parameter], max_norm: float | None) -> Callable[[], None]:
    """torch.nn.utils.clip_grad_norm_(params, max_norm) as a closure over the parameter list: the
    same operations (per-tensor norms, their norm, coefficient max_norm / (norm + 1e-6) capped at
    1, one foreach multiply) without its per-call grouping by device and dtype, 0.08 -> 0.05 ms a
    WAFFLe step. Parameters on several devices or of several dtypes take torch's own."""
    if max_norm is None:
        return lambda: None
    if len({(p.device, p.dtype) for p in params}) > 1:
        return lambda: torch.nn.utils.clip_grad_norm_(params, max_norm)

    def clip() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
            torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))

    return clip


def _with_proximal_term(model: nn.Module, batch_loss: Callable[[Tensor], Tensor], mu: float
                        ) -> Callable[[Tensor], Tensor]:
    """batch_loss plus FedProx's mu / 2 * ||w - w0||^2, w0 the shared tensors as training starts
    (the global model the site was just sent); private and frozen tensors are not pulled."""
    shared = {e.name for e in manifest_of(model).entries if e.role is Role.SHARED}
    anchored = [(p, p.detach().clone()) for name, p in model.named_parameters()
                if name in shared and p.requires_grad]

    params, anchors = [p for p, _ in anchored], [p0 for _, p0 in anchored]

    def loss(idx: Tensor) -> Tensor:
        if not params:
            return batch_loss(idx)
        return batch_loss(idx) + _ProximalTerm.apply(mu, anchors, *params)

    return loss


class _ProximalTerm(torch.autograd.Function):
    """mu / 2 * sum_i ||p_i - p0_i||^2 with its gradient mu (p_i - p0_i), as one autograd node:
    the composition was 4 recorded operations per tensor (a FedProx step, in CPU time, 1.35x faster
    on the 784-256-128-10 MLP, 1.1x on the 64-256-128-10 one)."""

    @staticmethod
    def forward(ctx, mu, anchors, *params):
        diffs = torch._foreach_sub(params, anchors)
        ctx.save_for_backward(*diffs)
        ctx.mu = mu
        return 0.5 * mu * torch.stack(torch._foreach_norm(diffs, 2.0)).square().sum()

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *torch._foreach_mul(list(ctx.saved_tensors), grad * ctx.mu))


@torch.no_grad()
def evaluate(model: nn.Module, x, y, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy and mean cross-entropy in eval mode (WAFFLe gates at their posterior mode)."""
    x, y = _as_tensors(x, y)
    device = device_of(model)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return {"accuracy": correct / x.shape[0], "loss": loss_sum / x.shape[0]}
