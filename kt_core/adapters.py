"""Adapters on any model: WAFFLe, LoRA, FFA-LoRA or dense layers placed by module-name patterns.

`apply_adapters(model, kind, targets, **sizes)` is PEFT's `target_modules` for ktfed: every
`nn.Linear` and `nn.Conv2d` whose dotted module name a pattern matches is replaced, in place, by
the adapter of kt_core.factorized built on that layer's pretrained weight, and everything else of
the model is frozen. Each adapter starts as the layer it replaces (WAFFLe's W_a and LoRA's B are
zero, dense copies the weight), so the adapted model computes what the model did. The factor
manifest (kt_core.manifest.manifest_of) then reads the roles from the adapters: their shared
factors travel, their private ones stay at the site, the frozen base never moves.

A pattern matches a module when it matches its full dotted name (fnmatch: "encoder.*.fc?") or the
name's tail after a dot ("q_proj" matches "layers.0.attn.q_proj", as PEFT's list form does);
"re:" starts a regular expression matched against the full name. A pattern that names no layer
that can be adapted is an error (a typo must not silently train nothing), and so is a pattern
without wildcards that names a layer of another type; layers of other types that a wildcard
happens to cover (norms, embeddings) stay frozen.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.factorized import ADAPTERS, Adapter
from kt_core.models import ModelConfig, layer_seed

ADAPTABLE = (nn.Linear, nn.Conv2d)
# the sizes apply_adapters takes, and which adapter kinds use each (the others ignore it)
SIZES = {"n_factors": ("waffle",), "ibp_alpha": ("waffle",), "temperature": ("waffle",),
         "gate_init": ("waffle",), "gate_lr_scale": ("waffle",), "lora_rank": ("lora", "ffa_lora"),
         "lora_alpha": ("lora", "ffa_lora")}
_KWARG = {"lora_rank": "rank", "lora_alpha": "alpha"}


class AdapterError(ValueError):
    """Adapters cannot be placed as asked; the message names the pattern, module or type."""


def normalize_kind(kind: str) -> str:
    """"ffa-lora" is accepted for "ffa_lora" (the spelling of the papers and of PEFT)."""
    name = str(kind).replace("-", "_")
    if name not in ADAPTERS:
        raise AdapterError(f"adapter kind {kind!r} is not one of {sorted(ADAPTERS)}")
    return name


class AdaptedConv2d(nn.Module):
    """A Conv2d whose weight is an adapter's: the (out, in/groups, kh, kw) kernel is the adapter's
    (out, in/groups*kh*kw) effective weight reshaped, so the adapter's roles, KL term and manifest
    entries are exactly those of a linear adapter of that size (under "<name>.adapter.*").

    An ungrouped convolution runs as the adapter's own forward over the unfolded input patches
    (im2col: conv2d(x, W) = W_flat @ unfold(x) at every output position). That costs the patch
    matrix's memory, but it makes the adapter's parameters used by the adapter's own forward, so
    DP-SGD's per-sample gradient rules for linear adapters (security/dp/grad_samplers) apply to the
    convolution unchanged. A grouped convolution keeps F.conv2d and is refused under DP-SGD."""

    def __init__(self, conv: nn.Conv2d, adapter: Adapter):
        super().__init__()
        self.adapter = adapter
        self.kernel_shape = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        # the padding nn.Conv2d applies, as F.pad takes it (string paddings such as "same" resolved)
        self._pad = tuple(conv._reversed_padding_repeated_twice)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def effective_weight(self) -> Tensor:
        return self.adapter.effective_weight().reshape(self.kernel_shape)

    def forward(self, x: Tensor) -> Tensor:
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        x = F.pad(x, self._pad, mode=mode) if any(self._pad) else x
        if self.groups != 1:
            return F.conv2d(x, self.effective_weight(), self.adapter.bias, self.stride, 0, self.dilation, self.groups)
        kh, kw = self.kernel_shape[2:]
        n, _, h, w = x.shape
        h_out = (h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        patches = F.unfold(x, (kh, kw), dilation=self.dilation, stride=self.stride)   # n, in*kh*kw, L
        out = self.adapter(patches.transpose(1, 2))                                  # n, L, out
        return out.transpose(1, 2).reshape(n, self.out_channels, h_out, w_out)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_shape[2:]}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


def _compile(pattern: str):
    if not isinstance(pattern, str) or not pattern:
        raise AdapterError(f"target pattern {pattern!r}: must be a non-empty string")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise AdapterError(f"target pattern {pattern!r}: not a valid regular expression ({err})") from None
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _has_wildcard(pattern: str) -> bool:
    return pattern.startswith("re:") or any(c in pattern for c in "*?[")


def _own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _sample(names: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", … ({len(names)} in all)" if len(names) > n else "")


def match_targets(model: nn.Module, targets) -> list[str]:
    """Names of the layers `targets` select, in module order; AdapterError for a pattern that
    selects no adaptable layer or names one of a type that cannot be adapted."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise AdapterError("targets: no module-name patterns given")
    modules = [(name, m) for name, m in model.named_modules() if name]
    adaptable_names = [n for n, m in modules if isinstance(m, ADAPTABLE)]
    chosen: dict[str, None] = {}
    for pattern in targets:
        matches = _compile(pattern)
        hit = [(n, m) for n, m in modules if matches(n)]
        wrong = [(n, m) for n, m in hit if not isinstance(m, ADAPTABLE) and _own_parameters(m)
                 and not isinstance(m, (Adapter, AdaptedConv2d))]
        if wrong and not _has_wildcard(pattern):
            n, m = wrong[0]
            raise AdapterError(f"target pattern {pattern!r} matches module {n!r} of type {type(m).__name__}, which "
                               "cannot be adapted (only nn.Linear and nn.Conv2d can)")
        good = [n for n, m in hit if isinstance(m, ADAPTABLE)]
        if not good:
            if any(isinstance(m, (Adapter, AdaptedConv2d)) for _, m in hit):
                raise AdapterError(f"target pattern {pattern!r}: the layers it matches already carry adapters")
            what = (f"only modules that cannot be adapted: {_sample([f'{n} ({type(m).__name__})' for n, m in wrong])}"
                    if wrong else "no module")
            raise AdapterError(f"target pattern {pattern!r} matches {what}; the model's linear and conv layers are "
                               f"{_sample(adaptable_names) or 'none'}")
        chosen.update(dict.fromkeys(good))
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


def _adapter_kwargs(kind: str, sizes: dict) -> dict:
    unknown = sorted(set(sizes) - set(SIZES) - {"seed"})
    if unknown:
        raise AdapterError(f"unknown adapter size(s) {unknown} (known: {sorted(SIZES)} and seed)")
    return {_KWARG.get(k, k): v for k, v in sizes.items() if k != "seed" and kind in SIZES[k]}


def _make(kind: str, kwargs: dict, in_features: int, out_features: int, seed: int,
          weight: Tensor, bias: Tensor | None) -> Adapter:
    try:
        return ADAPTERS[kind](in_features, out_features, base=weight, base_bias=bias, seed=seed, **kwargs)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"adapter {kind}: {err}") from None


def apply_adapters(model: nn.Module, kind: str, targets, **sizes) -> list[str]:
    """In place: freeze `model`, then replace each nn.Linear / nn.Conv2d that `targets` select by an
    adapter of `kind` (waffle | lora | ffa_lora | dense) on its weight and bias. `sizes`: n_factors,
    ibp_alpha, temperature, gate_init, gate_lr_scale (waffle), lora_rank, lora_alpha (LoRA kinds),
    seed (each layer's initial values come from it, identical at every site). Returns the names of
    the adapted layers, in module order."""
    kind = normalize_kind(kind)
    seed = int(sizes.get("seed", 0))
    kwargs = _adapter_kwargs(kind, sizes)
    names = match_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, name in enumerate(names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, attr)
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
        if isinstance(layer, nn.Conv2d):
            out_ch, fan_in = weight.shape[0], math.prod(weight.shape[1:])
            adapter = _make(kind, kwargs, fan_in, out_ch, layer_seed(seed, i), weight.reshape(out_ch, fan_in), bias)
            replacement: nn.Module = AdaptedConv2d(layer, adapter)
        else:
            replacement = _make(kind, kwargs, layer.in_features, layer.out_features, layer_seed(seed, i), weight, bias)
        setattr(parent, attr, replacement.to(weight.device))
    return names


def adapted_layers(model: nn.Module) -> dict[str, str]:
    """name -> kind of layer ("linear" or "conv2d") of every adapter apply_adapters placed."""
    out, inside = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, AdaptedConv2d):
            out[name] = f"conv2d/{type(m.adapter).__name__}"
            inside.add(id(m.adapter))
        elif isinstance(m, Adapter) and id(m) not in inside:
            out[name] = f"linear/{type(m).__name__}"
    return out


@dataclass(frozen=True)
class DPProblem:
    module: str
    detail: str

    def __str__(self) -> str:
        return f"{self.module}: {self.detail}"


def dp_problems(model: nn.Module, grad_sample_mode: str = "hooks") -> list[DPProblem]:
    """Why record-level DP-SGD (Opacus) cannot train `model` as it is ([] when it can): the layers
    Opacus' ModuleValidator refuses (BatchNorm mixes records within a batch), and adapted grouped
    convolutions, whose per-sample gradients no rule computes (ungrouped ones run as their linear
    adapter over unfolded patches, which has its rule)."""
    from opacus.validators import ModuleValidator

    problems = [DPProblem(name, f"{type(m.adapter).__name__} on a grouped Conv2d (groups={m.groups}): DP-SGD's "
                                "per-sample gradients are computed for ungrouped convolutions only")
                for name, m in model.named_modules() if isinstance(m, AdaptedConv2d) and m.groups != 1]
    for err in ModuleValidator.validate(model, strict=False):
        problems.append(DPProblem("model", str(err)))
    # Opacus validates trainable modules only, but a frozen BatchNorm in training mode still mixes
    # the records of a batch (its batch statistics), which per-record clipping does not bound
    problems += [DPProblem(name, f"{type(m).__name__} normalizes over the batch, mixing records (frozen or not): "
                                 "replace it with GroupNorm or LayerNorm")
                 for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())]
    if grad_sample_mode != "hooks" and any(isinstance(m, ADAPTERS["waffle"]) for m in model.modules()):
        problems.append(DPProblem("model", f"WAFFLe layers draw random gates in every forward pass; grad_sample_mode "
                                           f"{grad_sample_mode!r} would recompute the forward with other gates: use 'hooks'"))
    return problems


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class AdapterSettings:
    """`[task.adapter]` of a python task: which adapter, on which layers, of what size. The defaults
    of the sizes are the navigation task's, validated for adapters on a pretrained base."""
    adapter: str = "waffle"           # waffle | lora | ffa_lora (or ffa-lora) | dense
    targets: tuple[str, ...] = ()     # module-name patterns; () = the task's own FederatedTask.targets
    n_factors: int = 16
    ibp_alpha: float = 4.0
    temperature: float = 0.67
    gate_init: float = 1.0
    gate_lr_scale: float = 30.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0

    def __post_init__(self):
        # a config that went through JSON comes back with a list
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.adapter, str):   # one spelling in the run config sites check
            object.__setattr__(self, "adapter", self.adapter.replace("-", "_"))

    def sizes(self) -> dict:
        return {name: getattr(self, name) for name in (*SIZES, "seed")}

    def validate(self) -> None:
        try:
            normalize_kind(self.adapter)
        except AdapterError:
            raise ValueError(f"adapter: {self.adapter!r} is not one of {sorted(ADAPTERS)}") from None
        for i, pattern in enumerate(self.targets):
            try:
                _compile(pattern)
            except AdapterError as err:
                raise ValueError(f"targets[{i}]: {err}") from None
        # the sizes: the same checks as the image task's and the navigation adapters' (kt_core.models)
        ModelConfig(adapter=normalize_kind(self.adapter), **self.sizes()).validate()
