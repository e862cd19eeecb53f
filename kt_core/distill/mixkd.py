"""MixKD (Liang, Hao et al., ICLR 2021) and its two baselines, plain KD and no KD.

A student learns from a teacher on the training inputs and on *virtual* inputs made by mixup:
for a pair of examples (i, j) and λ ~ Beta(α, α), the input embeddings are interpolated,
e_mix = λ·e_i + (1 − λ)·e_j (word embeddings for text, visual features for navigation). Four
losses, each with its weight from the config:

    ce      student cross-entropy on the originals
    kd      KD to the teacher on the originals (KL at temperature T, scaled by T²)
    mix_kd  KD to the teacher's soft labels *on the mixed input* (the teacher is run on it)
    mix_ce  student cross-entropy on the mixed input against both labels, λ·CE(y_i) + (1−λ)·CE(y_j)

Plain KD is ce + kd; no KD is ce alone. All three share one interface (`Objective.loss`), so the
training loop, DDP and the benchmarks treat them alike.

Models plug in through `Mixable`: `embed(batch)` returns the continuous inputs to interpolate and
`classify(embedded, batch)` maps them to logits. A batch is a dict of tensors with the batch on
dim 0; keys ending in "mask" are padding masks, and the mixed example attends to the union of its
two parents' positions (a padded position of one parent is still a real token of the other).
`MixableModule.forward(batch, mix)` runs the originals and the mixed copies as one batch of 2B: one
pass instead of two, and one `forward` call, which DistributedDataParallel needs to see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.config_file import ConfigError

METHODS = ("mixkd", "kd", "none")
Batch = dict[str, Tensor]


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    kd: float = 1.0
    mix_kd: float = 1.0
    mix_ce: float = 1.0


@dataclass(frozen=True)
class DistillConfig:
    """How one student is trained. `validate()` names the offending field in its error."""

    method: str = "mixkd"
    alpha: float = 0.4            # Beta(α, α): α < 1 puts most λ near 0 or 1 (mild mixing)
    temperature: float = 2.0
    weights: LossWeights = LossWeights()
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1           # fraction of the steps with a linear learning-rate warm-up
    max_grad_norm: float = 1.0    # 0 = no clipping
    seed: int = 0
    device: str = "auto"
    amp: bool = True              # mixed precision on CUDA (bf16 where supported)

    def validate(self) -> "DistillConfig":
        def need(ok: bool, name: str, text: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {text}")

        need(self.method in METHODS, "method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        need(math.isfinite(self.alpha) and self.alpha > 0, "alpha",
             f"must be > 0 (λ ~ Beta(alpha, alpha) is undefined otherwise), got {self.alpha}")
        need(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
             f"must be > 0, got {self.temperature}")
        for f in fields(self.weights):
            value = getattr(self.weights, f.name)
            need(math.isfinite(value) and value >= 0, f"weights.{f.name}", f"must be a finite number >= 0, got {value}")
        active = {"mixkd": ("ce", "kd", "mix_kd", "mix_ce"), "kd": ("ce", "kd"), "none": ("ce",)}[self.method]
        need(any(getattr(self.weights, w) > 0 for w in active), "weights",
             f"every loss that method {self.method!r} uses ({', '.join(active)}) has weight 0")
        need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        need(self.batch_size >= (2 if self.method == "mixkd" else 1), "batch_size",
             f"must be >= {2 if self.method == 'mixkd' else 1} (mixup pairs examples of a batch), got {self.batch_size}")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(0 <= self.warmup < 1, "warmup", f"must be in [0, 1), got {self.warmup}")
        need(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        return self


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mix:
    """Which example each example is mixed with, and how much of itself it keeps."""

    perm: Tensor   # [B] long
    lam: Tensor    # [B] float in [0, 1]


def sample_mix(batch_size: int, alpha: float, generator: torch.Generator, device: torch.device | str = "cpu") -> Mix:
    """One λ ~ Beta(α, α) per example, partners from a random permutation of the batch. Drawn on
    the CPU from the given generator (numpy's Beta seeded from it: torch's Beta takes no
    generator), so a run is reproducible whatever the device."""
    if alpha <= 0:
        raise ConfigError(f"alpha: must be > 0, got {alpha}")
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=batch_size).astype(np.float32))
    perm = torch.randperm(batch_size, generator=generator)
    return Mix(perm.to(device), lam.to(device))


def mix_tensor(x: Tensor, mix: Mix) -> Tensor:
    """λ·x_i + (1 − λ)·x_perm(i), λ broadcast over the non-batch dims."""
    lam = mix.lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[mix.perm]


def mixed_batch(batch: Batch, mix: Mix) -> Batch:
    """The non-embedded side of the mixed examples. A position is real in the mixed example when
    it is real in a parent that contributes to it: the union of the two masks for 0 < λ < 1, and
    exactly the original's mask at λ = 1 (so λ = 1 gives back the original example)."""
    out = {}
    for key, value in batch.items():
        if key.endswith("mask"):
            shape = (-1, *([1] * (value.dim() - 1)))
            own = value * (mix.lam > 0).view(shape).to(value.dtype)
            partner = value[mix.perm] * (mix.lam < 1).view(shape).to(value.dtype)
            out[key] = torch.maximum(own, partner)
        else:
            out[key] = value
    return out


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s KD: KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch
    (the T² keeps the gradient scale independent of T)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def mixup_ce(logits: Tensor, labels: Tensor, mix: Mix) -> Tensor:
    """λ·CE(y_i) + (1 − λ)·CE(y_perm(i)), averaged over the batch."""
    lam = mix.lam.float()
    ce_i = F.cross_entropy(logits.float(), labels, reduction="none")
    ce_j = F.cross_entropy(logits.float(), labels[mix.perm], reduction="none")
    return (lam * ce_i + (1 - lam) * ce_j).mean()


# ---------------------------------------------------------------------------------------------
# models that can be mixed
# ---------------------------------------------------------------------------------------------

class Mixable(Protocol):
    def embed(self, batch: Batch) -> dict[str, Tensor]: ...
    def classify(self, embedded: Mapping[str, Tensor], batch: Batch) -> Tensor: ...


def forward_mixable(model: Mixable, batch: Batch, mix: Mix | None = None, originals: bool = True) -> Tensor:
    """Logits of the originals ([B, C]), of the mixed copies (`originals=False`), or of both
    stacked ([2B, C], originals first) in one pass."""
    embedded = model.embed(batch)
    if mix is None:
        return model.classify(embedded, batch)
    mixed_emb = {k: mix_tensor(v, mix) for k, v in embedded.items()}
    mixed = mixed_batch(batch, mix)
    if not originals:
        return model.classify(mixed_emb, mixed)
    both_emb = {k: torch.cat([embedded[k], mixed_emb[k]]) for k in embedded}
    both = {k: torch.cat([v, mixed[k]]) for k, v in batch.items()}
    return model.classify(both_emb, both)


class MixableModule(nn.Module):
    """Base class: subclasses define `embed` and `classify`; `forward` handles mixing."""

    def embed(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def classify(self, embedded: Mapping[str, Tensor], batch: Batch) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: Batch, mix: Mix | None = None, originals: bool = True) -> Tensor:
        return forward_mixable(self, batch, mix, originals)


# ---------------------------------------------------------------------------------------------
# the objectives
# ---------------------------------------------------------------------------------------------

class Objective:
    """One training loss for a student. `loss` returns the weighted total and its parts (floats,
    for logging). The teacher may be None when the batch carries precomputed "teacher_logits"
    and the objective needs nothing else from it (plain KD)."""

    name = "none"
    needs_teacher = False        # teacher logits on the originals (precomputable)
    needs_teacher_model = False  # the teacher itself, every step (mixed inputs)

    def __init__(self, config: DistillConfig):
        self.config = config.validate()
        self.w = config.weights

    def loss(self, student: nn.Module, teacher: nn.Module | None, batch: Batch,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        logits = student(batch)
        ce = F.cross_entropy(logits.float(), batch["labels"])
        return ce, {"ce": float(ce.detach())}


class NoKD(Objective):
    name = "none"


class KD(Objective):
    name = "kd"
    needs_teacher = True

    def loss(self, student, teacher, batch, generator):
        logits = student(batch)
        ce = F.cross_entropy(logits.float(), batch["labels"])
        kd = kd_loss(logits, teacher_logits(teacher, batch), self.config.temperature)
        total = self.w.ce * ce + self.w.kd * kd
        return total, {"ce": float(ce.detach()), "kd": float(kd.detach())}


class MixKD(Objective):
    name = "mixkd"
    needs_teacher = True
    needs_teacher_model = True

    def loss(self, student, teacher, batch, generator):
        if teacher is None:
            raise ValueError("MixKD needs the teacher model: it labels the mixed inputs at every step")
        labels = batch["labels"]
        n = labels.shape[0]
        if n < 2:  # a last batch of one has no partner: train it like plain KD
            return KD(self.config).loss(student, teacher, batch, generator)
        mix = sample_mix(n, self.config.alpha, generator, labels.device)
        both = student(batch, mix)
        logits, mixed_logits = both[:n], both[n:]
        with torch.no_grad():
            t_orig = batch["teacher_logits"] if "teacher_logits" in batch else None
            if t_orig is None:
                t_both = teacher(batch, mix)
                t_orig, t_mixed = t_both[:n], t_both[n:]
            else:
                t_mixed = teacher(batch, mix, originals=False)
        t = self.config.temperature
        parts = {"ce": F.cross_entropy(logits.float(), labels), "kd": kd_loss(logits, t_orig, t),
                 "mix_kd": kd_loss(mixed_logits, t_mixed, t), "mix_ce": mixup_ce(mixed_logits, labels, mix)}
        total = sum(getattr(self.w, k) * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}


def teacher_logits(teacher: nn.Module | None, batch: Batch) -> Tensor:
    if "teacher_logits" in batch:
        return batch["teacher_logits"]
    if teacher is None:
        raise ValueError("KD needs the teacher or precomputed teacher_logits in the batch")
    with torch.no_grad():
        return teacher(batch)


def make_objective(config: DistillConfig) -> Objective:
    return {"mixkd": MixKD, "kd": KD, "none": NoKD}[config.validate().method](config)
