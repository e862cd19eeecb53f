"""DP-SGD for whatever torch model and optimizer it is handed (Opacus underneath).

Record-level (epsilon, delta)-DP for one site's data:
  * Poisson sampling: each step takes every record independently with probability q (Opacus'
    DPDataLoader), which is what the accountants assume; fixed shuffled batches void the
    accounting and are only allowed when the configuration explicitly acknowledges it;
  * per-sample gradients (`hooks`, `ew` or `functorch`), each clipped to `max_grad_norm`, summed,
    Gaussian noise of std `noise_multiplier * max_grad_norm` added, divided by the expected batch;
  * a large logical (Poisson) batch is split into physical batches of at most
    `max_physical_batch_size` without changing the mechanism (as Opacus' BatchMemoryManager does);
  * the steps themselves are kt_core.train.train_steps', the loop every task trains with.

Data-independent terms (the KL term of a variational ELBO, a weight prior) cost no privacy: their
gradient is a function of the parameters alone, which are already the output of the DP mechanism,
so adding it is post-processing. `train_dp` therefore takes them apart from the data loss: the
gradient of `public_loss()` is added to the DP parameters' gradients *after* clipping and noise,
and parameters that only that term touches (`public_params`, e.g. WAFFLe's Kumaraswamy stick
parameters, which appear in the KL only) are updated by their own plain optimizer and never pass
through Opacus. One caveat, documented where it is used: a public term scaled by 1/N uses the
site's N, the same N the sampling rate q is computed from; like Opacus, we treat N as public.

The randomness that the guarantee rests on (which records each step samples, the noise) comes
from a generator seeded with 64 bits of OS entropy, never from the run's seed: the coordinator
chooses that seed and could otherwise replay the noise and subtract it. Opacus' `secure_mode`
(a CSPRNG, against floating-point attacks on the noise) needs `torchcsprng`, which is not installed.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from kt_core.train import TrainConfig, train_steps
from security.dp import grad_samplers

GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch")


class DPUnsupportedError(ValueError):
    """The model cannot be trained with DP-SGD as configured; the message says why and what to do."""


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    batch_size: int                  # expected (logical) batch size
    epochs: int = 1
    max_steps: int | None = None
    grad_sample_mode: str = "hooks"
    max_physical_batch_size: int = 0  # 0: no split
    poisson: bool = True


@dataclass(frozen=True)
class RoundPlan:
    """What one round of local DP-SGD will spend: `steps` draws at sampling rate q."""

    sample_rate: float
    steps: int
    steps_per_epoch: int


def plan_round(num_samples: int, batch_size: int, epochs: int, max_steps: int | None = None) -> RoundPlan:
    """q = 1 / ceil(N / B) (Opacus' DPDataLoader), ceil(N / B) steps per epoch, capped by max_steps."""
    if num_samples < 1 or batch_size < 1 or epochs < 1:
        raise ValueError("num_samples, batch_size and epochs must be >= 1")
    per_epoch = math.ceil(num_samples / batch_size)
    steps = per_epoch * epochs
    if max_steps:
        steps = min(steps, max_steps)
    return RoundPlan(sample_rate=1.0 / per_epoch, steps=steps, steps_per_epoch=per_epoch)


@dataclass
class DPTrainResult:
    num_samples: int
    steps: int
    loss: float
    seconds: float
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float


def secure_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def check_model(model: nn.Module, grad_sample_mode: str) -> None:
    """Refuse, with a clear message, a model DP-SGD cannot handle as configured."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise DPUnsupportedError(f"grad_sample_mode: {grad_sample_mode!r} is not one of {list(GRAD_SAMPLE_MODES)}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        details = "; ".join(str(e) for e in errors[:5])
        raise DPUnsupportedError(f"the model has layers DP-SGD does not support: {details} "
                                 "(e.g. replace BatchNorm with GroupNorm: opacus.validators.ModuleValidator.fix)")
    for name, module in model.named_modules():
        kind = grad_samplers.kind_of(module)
        if kind == "factorized" and grad_sample_mode != "hooks":
            raise DPUnsupportedError(
                f"layer {name or '<root>'} ({type(module).__name__}) draws random gates in every forward pass; "
                f"grad_sample_mode {grad_sample_mode!r} would recompute the forward with other gates: use 'hooks'")


def train_dp(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: Callable[[Tensor, Tensor], Tensor],
             optimizer: torch.optim.Optimizer, settings: DPSettings,
             public_loss: Callable[[], Tensor] | None = None, public_params: Iterable[nn.Parameter] = (),
             public_optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> DPTrainResult:
    """Train `model` in place with DP-SGD for one round, through kt_core.train's loop.

    `optimizer` holds the parameters the data touches (they get clipped, noised gradients);
    `public_params` (with `public_optimizer`) are touched only by `public_loss`, a data-independent
    term whose gradient is added after the noise. `seed` drives only non-private randomness
    (e.g. dropout or stochastic gates); sampling and noise use OS entropy.
    """
    check_model(model, settings.grad_sample_mode)
    if settings.noise_multiplier <= 0 or settings.max_grad_norm <= 0:
        raise ValueError("noise_multiplier and max_grad_norm must be > 0")
    n = int(x.shape[0])
    plan = plan_round(n, settings.batch_size, settings.epochs, settings.max_steps)
    public_params = list(public_params)
    public_ids = {id(p) for p in public_params}
    dp_params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(id(p) in public_ids for p in dp_params):
        raise ValueError("a parameter is both private (in the DP optimizer) and public")
    gen = secure_generator()
    expected_batch = max(1, round(n * plan.sample_rate)) if settings.poisson else settings.batch_size
    was_training = model.training
    undo = grad_samplers.instrument(model)
    for p in public_params:
        p.requires_grad_(False)  # keep them out of Opacus' per-sample hooks
    # strict=False: frozen buffers (a LoRA layer's W0) are fine, they get no gradient at all
    extra = {} if settings.grad_sample_mode == "ew" else {"strict": False}
    try:
        gsm = wrap_model(model, settings.grad_sample_mode, batch_first=True, loss_reduction="mean", **extra)
    except NotImplementedError as err:
        undo()
        for p in public_params:
            p.requires_grad_(True)
        raise DPUnsupportedError(f"Opacus cannot compute per-sample gradients for this model in "
                                 f"{settings.grad_sample_mode!r} mode: {err}") from None
    dp_opt = DPOptimizer(optimizer, noise_multiplier=settings.noise_multiplier,
                         max_grad_norm=settings.max_grad_norm, expected_batch_size=expected_batch,
                         loss_reduction="mean", generator=gen)
    step = _PrivateStep(dp_opt, public_loss, dp_params, public_params, public_optimizer)
    batches = _PrivateBatches(gsm, x, y, loss_fn, dp_opt, settings, plan, gen)
    # the loop's own batch order only paces the steps; which records a step takes is drawn above
    loop_cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, max_steps=plan.steps,
                           seed=seed, kl_weight=0.0, max_grad_norm=None)   # DP clips per sample
    try:
        with warnings.catch_warnings():
            # the first layer's input needs no gradient; Opacus' full backward hook still fires
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            result = train_steps(gsm, n, batches.loss, loop_cfg, optimizer=step)
    finally:
        dp_opt.zero_grad(set_to_none=True)
        _restore(model, gsm, undo, public_params, was_training)
    return DPTrainResult(num_samples=n, steps=result.steps, loss=batches.mean_loss(), seconds=result.seconds,
                         sample_rate=plan.sample_rate, noise_multiplier=settings.noise_multiplier,
                         max_grad_norm=settings.max_grad_norm)


class _PrivateBatches:
    """The records of each DP-SGD step and their loss: a Poisson draw (every record with
    probability q, from OS entropy), or without Poisson sampling a slice of a secret shuffle; a
    draw above max_physical_batch_size is cut into physical batches whose clipped per-sample
    gradients add up before the one noisy step (as Opacus' BatchMemoryManager does)."""

    def __init__(self, gsm, x: Tensor, y: Tensor, loss_fn, dp_opt: DPOptimizer, settings: DPSettings,
                 plan: RoundPlan, gen: torch.Generator):
        self.gsm, self.x, self.y, self.loss_fn, self.dp_opt, self.gen = gsm, x, y, loss_fn, dp_opt, gen
        self.settings, self.plan = settings, plan
        self.physical = settings.max_physical_batch_size or max(settings.batch_size * 4, 1)
        self.steps, self.loss_sum, self.batches = 0, 0.0, 0
        self.secret: Tensor | None = None

    def records(self, idx: Tensor) -> Tensor:
        n = self.x.shape[0]
        if self.settings.poisson:
            return torch.nonzero(torch.rand(n, generator=self.gen) < self.plan.sample_rate).flatten()
        if self.steps % self.plan.steps_per_epoch == 0:
            # a fresh secret permutation per epoch: the run's seed, which the coordinator knows,
            # must not decide the batches
            self.secret = torch.randperm(n, generator=self.gen)
        return self.secret[idx]

    def loss(self, idx: Tensor) -> Tensor:
        rows = self.records(idx)
        self.steps += 1
        chunks = list(rows.split(self.physical)) if len(rows) else [rows]
        for chunk in chunks[:-1]:
            self.dp_opt.zero_grad(set_to_none=True)   # keeps what earlier chunks of this step added up
            self._chunk_loss(chunk).backward()
            self.dp_opt.signal_skip_step(do_skip=True)
            self.dp_opt.pre_step()   # clips and adds up; the noisy step waits for the last chunk
        return self._chunk_loss(chunks[-1])   # the loop clears, back-propagates and steps it

    def _chunk_loss(self, chunk: Tensor) -> Tensor:
        out = self.gsm(self.x[chunk])
        if not len(chunk):  # an empty Poisson draw is still a step: zero gradient, full noise
            return out.sum() * 0.0
        loss = self.loss_fn(out, self.y[chunk])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.steps - 1}")
        self.loss_sum += loss.item()
        self.batches += 1
        return loss

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.batches, 1)


class _PrivateStep:
    """What the training loop steps: the noisy DP step on the private parameters, then the
    public term's gradient (post-processing) and the public parameters' own step."""

    def __init__(self, dp_opt: DPOptimizer, public_loss, dp_params, public_params, public_optimizer):
        self.dp_opt, self.public_loss, self.public_optimizer = dp_opt, public_loss, public_optimizer
        self.dp_params, self.public_params = dp_params, public_params

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dp_opt.zero_grad(set_to_none=set_to_none)
        # the public (KL-only) parameters are outside the DP optimizer: without this their
        # gradient would add up over every step of the round
        for p in self.public_params:
            p.grad = None

    def step(self) -> None:
        if not self.dp_opt.pre_step():
            return
        if self.public_loss is not None:
            _add_public_gradients(self.public_loss, self.dp_params, self.public_params)
        self.dp_opt.original_optimizer.step()
        if self.public_optimizer is not None and self.public_params:
            self.public_optimizer.step()


def _restore(model: nn.Module, gsm, undo, public_params: list[nn.Parameter], was_training: bool) -> None:
    """Take Opacus' hooks and per-sample state off the model, as it was before train_dp."""
    for p in public_params:
        p.requires_grad_(True)
        p.grad = None
    if hasattr(gsm, "_close"):
        gsm._close()
    elif hasattr(gsm, "remove_hooks"):
        gsm.remove_hooks()
    undo()
    for p in model.parameters():
        for attr in ("grad_sample", "_current_grad_sample", "_forward_counter", "summed_grad"):
            if hasattr(p, attr):
                try:
                    delattr(p, attr)
                except AttributeError:
                    pass
    # the activations a forward pass left for a backward that never ran (a step whose loss was
    # not finite raises between the two): the next round's first backward would take them as its own
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in module.__dict__:
                delattr(module, attr)
    model.train(was_training)


@dataclass
class PrivateTraining:
    """What `make_private` hands back for a training loop of the caller's own: the module,
    optimizer and Poisson data loader to train with, and what the round spent so far."""
    module: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: object
    records: int
    _engine: object

    def epsilon(self, delta: float) -> float:
        return float(self._engine.get_epsilon(delta=delta))


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, data_loader, *, noise_multiplier: float,
                 max_grad_norm: float, accountant: str = "prv") -> PrivateTraining:
    """DP-SGD for a loop that is not kt_core.train's (e.g. distillation, with its own schedule
    and DDP): Poisson sampling, per-sample clipping, Gaussian noise from OS entropy, never from
    the run's seed. Under DDP `module` arrives wrapped in `distributed_wrapper()`, for which Opacus
    picks its distributed optimizer: every process clips, rank 0 alone adds the noise, the sum is
    all-reduced."""
    from opacus import PrivacyEngine

    if noise_multiplier <= 0 or max_grad_norm <= 0:
        raise ValueError("noise_multiplier and max_grad_norm must be > 0")
    engine = PrivacyEngine(accountant=accountant)
    module, optimizer, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, noise_generator=secure_generator())
    return PrivateTraining(module, optimizer, loader, len(loader.dataset), engine)


def distributed_wrapper() -> type:
    """The DDP wrapper DP-SGD needs under several processes (Opacus' DPDDP)."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

    return DifferentiallyPrivateDistributedDataParallel


def _add_public_gradients(public_loss: Callable[[], Tensor], dp_params: list[nn.Parameter],
                          public_params: list[nn.Parameter]) -> None:
    """Post-processing: add the gradient of a data-independent term after the noise."""
    for p in public_params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            value = public_loss()
            if not value.requires_grad:   # e.g. no Bayesian layer: nothing to add
                return
            targets = dp_params + public_params
            grads = torch.autograd.grad(value, targets, allow_unused=True)
    finally:
        for p in public_params:
            p.requires_grad_(False)
    for p, g in zip(targets, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g.detach())
