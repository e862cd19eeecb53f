"""Per-sample gradient rules for custom linear adapters (Opacus `hooks` mode).

Opacus' `hooks` mode computes per-sample gradients from each module's input activations A and the
gradients B of the loss with respect to its output (already multiplied by the batch size for a
mean-reduced loss). A custom module needs its own rule: registered here by class, duck-typed on
parameter names, so this package never imports the project's models.

  "linear"      y = x W^T + b                                        (dense)
  "lowrank"     y = x W0^T + b + s (x A^T) B^T                        (LoRA; A may be a frozen buffer)
  "factorized"  y = ((x Wb^T) * (r * g)) Wa^T + b [+ x W0^T]          (WAFFLe; g = gates of this forward)

For "factorized" the gates g are random per forward pass, so the rule must use the very gates the
forward used (recomputing them, as `functorch` mode would, draws new ones). `instrument` wraps the
module's `gates()` so each training forward stores g and dg/d(gate_logits) on the module
(g_k depends on gate_logit_k only, so the Jacobian is a diagonal, computed by one small autograd
call at forward time). With y depending on gate_logits through g:
    dL/dWa_i = B_i^T (h0_i * s)        dL/dWb_i = (B_i Wa * s)^T x_i
    dL/ds_i  = sum (B_i Wa) * h0_i     dL/dr_i = dL/ds_i * g        dL/dlogit_i = dL/ds_i * r * dg/dlogit
"""
from __future__ import annotations

from typing import Callable

import torch
from opacus.grad_sample import GradSampleModule
from torch import Tensor, nn

KINDS = ("linear", "lowrank", "factorized")


def _trainable(p) -> bool:
    return isinstance(p, nn.Parameter) and p.requires_grad


def _linear(module: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    x, b = activations[0], backprops
    out = {}
    if _trainable(module.weight):
        out[module.weight] = torch.einsum("n...o,n...i->noi", b, x)
    if getattr(module, "bias", None) is not None and _trainable(module.bias):
        out[module.bias] = torch.einsum("n...o->no", b)
    return out


def _lowrank(module: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    x, b = activations[0], backprops
    s = float(module.scaling)
    a, bm = module.lora_a, module.lora_b
    out = {}
    z = torch.nn.functional.linear(x, a)                         # n..r
    if _trainable(bm):
        out[bm] = s * torch.einsum("n...o,n...r->nor", b, z)
    if _trainable(a):
        dz = s * torch.matmul(b, bm)                             # n..r
        out[a] = torch.einsum("n...r,n...i->nri", dz, x)
    if _trainable(module.bias):
        out[module.bias] = torch.einsum("n...o->no", b)
    return out


def _factorized(module: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    record = getattr(module, "_dp_gates", None)
    if record is None:
        raise RuntimeError(f"{type(module).__name__}: no gates recorded for this forward pass "
                           "(the module was not instrumented for DP-SGD)")
    gates, jac = record
    x, b = activations[0], backprops
    r = module.r.detach()
    s = r * gates                                                 # K
    h0 = torch.nn.functional.linear(x, module.w_b.detach())       # n..K
    dh = torch.matmul(b, module.w_a.detach())                     # n..K
    out = {}
    if _trainable(module.w_a):
        out[module.w_a] = torch.einsum("n...o,n...k->nok", b, h0 * s)
    if _trainable(module.w_b):
        out[module.w_b] = torch.einsum("n...k,n...i->nki", dh * s, x)
    ds = torch.einsum("n...k->nk", dh * h0)                       # n K: gradient w.r.t. s = r * g
    if _trainable(module.r):
        out[module.r] = ds * gates
    if _trainable(module.gate_logits):
        out[module.gate_logits] = ds * r * jac
    if _trainable(module.bias):
        out[module.bias] = torch.einsum("n...o->no", b)
    return out


RULES: dict[str, Callable] = {"linear": _linear, "lowrank": _lowrank, "factorized": _factorized}
_registered: dict[type, str] = {}


def register(cls: type, kind: str) -> None:
    """Tell Opacus how to compute per-sample gradients of `cls` (idempotent)."""
    if kind not in RULES:
        raise ValueError(f"unknown grad-sampler kind {kind!r} (choose {', '.join(KINDS)})")
    GradSampleModule.GRAD_SAMPLERS[cls] = RULES[kind]
    _registered[cls] = kind


def kind_of(module: nn.Module) -> str | None:
    return _registered.get(type(module))


def instrument(model: nn.Module) -> Callable[[], None]:
    """Make every factorized module record its forward's gates; returns the undo function."""
    wrapped = []
    for module in model.modules():
        if kind_of(module) != "factorized":
            continue
        original = module.gates                                  # the bound method

        def recording(module=module, original=original):
            g = original()
            if module.training and torch.is_grad_enabled() and module.gate_logits.requires_grad \
                    and g.requires_grad:
                (jac,) = torch.autograd.grad(g, module.gate_logits, torch.ones_like(g), retain_graph=True)
                module._dp_gates = (g.detach(), jac.detach())
            else:
                module._dp_gates = (g.detach(), torch.zeros_like(g))
            return g

        module.gates = recording
        wrapped.append(module)

    def undo():
        for module in wrapped:
            module.__dict__.pop("gates", None)
            module.__dict__.pop("_dp_gates", None)
    return undo
