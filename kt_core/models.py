"""The image-task model: an MLP whose linear layers are adapters, plus the state a site moves.

shared_state is what may leave a site (the egress guard checks it against the manifest);
private_state is what a site keeps on disk; frozen tensors are rebuilt from the seed everywhere.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.factorized import ADAPTERS, Adapter, FactorizedLinear
from kt_core.factorized_kl import grouped_kl
from kt_core.manifest import Role, dtype_name, manifest_of


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pos_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0


# the most factors (WAFFLe) or the highest rank (LoRA) an adapter may have: far above any useful
# size, low enough that a config cannot make a site allocate without bound
MAX_RANK = 4096
# The run config comes from a coordinator a site need not trust, and a site builds its model from
# it before anything else: `hidden = [100000000]` asked for a 313 GB tensor. The demo's MLP has
# 0.2 M parameters; 2^26 (256 MB in float32, a few times that with the optimizer's state) leaves
# room for any MLP this task is for and none for exhausting a site's memory.
MAX_PARAMETERS = 1 << 26
MAX_HIDDEN_LAYERS = 32


@dataclass(frozen=True)
class ModelConfig:
    adapter: str = "waffle"            # waffle | lora | ffa_lora | dense
    input_dim: int = 784
    hidden: tuple[int, ...] = (256, 128)
    num_classes: int = 10
    # 5 factors on the seeded frozen base: >= 10x fewer bytes than dense on the digits MLP and the
    # accuracy of 16 (FactorizedLinear, "Why a seeded base")
    n_factors: int = 5
    ibp_alpha: float | None = None  # None: FactorizedLinear.IBP_ALPHA_PER_FACTOR x n_factors
    temperature: float = 0.67
    # Where the private gates start and how much faster than the dictionary they learn (see
    # FactorizedLinear.GATE_INIT / GATE_LR_SCALE for why the defaults are what they are).
    gate_init: float = 3.0
    gate_lr_scale: float = 100.0
    # The dictionary's learning-rate multiplier on the seeded base (FactorizedLinear.DICT_LR_SCALE
    # says why there is one, and why 8 where a site takes a few steps a round); a recipe whose
    # sites take many steps a round, or train under DP-SGD, where the multiplier scales the noise
    # as well, takes a smaller one (ktfed.launcher, the image demo's recipe)
    dict_lr_scale: float = FactorizedLinear.DICT_LR_SCALE
    # WAFFLe: the output layer's bias stays at the site, beside its factor selection
    # (FactorizedLinear, "Why a private output bias"); ignored by the other adapters
    private_output_bias: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0

    def __post_init__(self):
        # a config that went through JSON comes back with a list
        if isinstance(self.hidden, list):
            object.__setattr__(self, "hidden", tuple(self.hidden))

    def validate(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter: {self.adapter!r} is not one of {sorted(ADAPTERS)}")
        if not _is_int(self.input_dim) or self.input_dim < 1:
            raise ValueError(f"input_dim: must be a positive integer, got {self.input_dim!r}")
        if not isinstance(self.hidden, tuple) or not all(_is_int(h) and h >= 1 for h in self.hidden):
            raise ValueError(f"hidden: must be a tuple of positive integers, got {self.hidden!r}")
        if len(self.hidden) > MAX_HIDDEN_LAYERS:
            raise ValueError(f"hidden: at most {MAX_HIDDEN_LAYERS} layers, got {len(self.hidden)}")
        if not _is_int(self.num_classes) or self.num_classes < 2:
            raise ValueError(f"num_classes: must be an integer >= 2, got {self.num_classes!r}")
        for name in ("n_factors", "lora_rank"):   # bounded: the run config may come from a hostile coordinator
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_RANK:
                raise ValueError(f"{name}: must be an integer between 1 and {MAX_RANK}, got {value!r}")
        if not isinstance(self.gate_init, (int, float)) or isinstance(self.gate_init, bool) \
                or not math.isfinite(self.gate_init):
            raise ValueError(f"gate_init: must be a finite number, got {self.gate_init!r}")
        for name in ("ibp_alpha", "temperature", "lora_alpha", "gate_lr_scale", "dict_lr_scale"):
            if name == "ibp_alpha" and self.ibp_alpha is None:
                continue
            if not _is_pos_number(getattr(self, name)):
                raise ValueError(f"{name}: must be a finite number > 0, got {getattr(self, name)!r}")
        if not isinstance(self.private_output_bias, bool):
            raise ValueError(f"private_output_bias: must be true or false, got {self.private_output_bias!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: must be an integer between 0 and 2^32 - 1, got {self.seed!r}")
        if (n := self.parameter_count()) > MAX_PARAMETERS:
            raise ValueError(f"hidden: {list(self.hidden)} with input_dim {self.input_dim} and {self.adapter} adapters "
                             f"makes a model of {n:,} parameters, more than {MAX_PARAMETERS:,}")

    def parameter_count(self) -> int:
        """At least the model's tensors' elements (WAFFLe's within a few per cent), from the sizes
        alone, nothing allocated: every layer's weight (a WAFFLe layer's seeded base) and bias, and
        its adapter's factors."""
        dims = (self.input_dim, *self.hidden, self.num_classes)
        k, r = self.n_factors, self.lora_rank
        extra = {"waffle": lambda a, b: k * (a + b) + 4 * k + b,   # factors, strengths, gates, sticks, bias
                 "lora": lambda a, b: r * (a + b), "ffa_lora": lambda a, b: r * (a + b)}.get(self.adapter)
        return sum(a * b + b + (extra(a, b) if extra else 0) for a, b in zip(dims[:-1], dims[1:]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


def layer_seed(seed: int, index: int) -> int:
    # independent streams per layer: layer 1 of seed 0 must not be layer 0 of seed 1
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_adapter(cfg: ModelConfig, in_features: int, out_features: int, seed: int,
                 base: Tensor | None = None, base_bias: Tensor | None = None, output: bool = False) -> Adapter:
    """The adapter of cfg's kind for one layer; `output`: the model's last layer."""
    kw = {}
    if cfg.adapter == "waffle":
        kw = dict(n_factors=cfg.n_factors, ibp_alpha=cfg.ibp_alpha, temperature=cfg.temperature,
                  gate_init=cfg.gate_init, gate_lr_scale=cfg.gate_lr_scale, dict_lr_scale=cfg.dict_lr_scale,
                  private_bias=output and cfg.private_output_bias)
    elif cfg.adapter in ("lora", "ffa_lora"):
        kw = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    return ADAPTERS[cfg.adapter](in_features, out_features, base=base, base_bias=base_bias, seed=seed, **kw)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dims = (cfg.input_dim, *cfg.hidden, cfg.num_classes)
        self.layers = nn.ModuleList(
            make_adapter(cfg, d_in, d_out, layer_seed(cfg.seed, i), output=i == len(dims) - 2)
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])))

    def forward(self, x: Tensor) -> Tensor:
        # unpacked, not self.layers[:-1]: slicing builds a new ModuleList on every forward
        *hidden, last = self.layers
        x = x.flatten(1)
        for layer in hidden:
            x = F.relu(layer(x))
        return last(x)


def build_model(cfg: ModelConfig) -> MLP:
    cfg.validate()
    return MLP(cfg)


def kl_terms(model: nn.Module) -> list[Tensor]:
    """The model's non-zero KL terms: none for a model without Bayesian adapters (so a loss needs
    no zero added), else one per kind of WAFFLe layer (kt_core.factorized_kl.grouped_kl: the
    digits MLP's three layers in one node: KL 0.56 -> 0.28 ms a step) plus any other adapter's own.
    The noise is drawn layer by layer in module order, as each layer's kl_divergence() draws it."""
    terms, problems = [], []
    for m in model.modules():
        if not isinstance(m, Adapter) or type(m).kl_divergence is Adapter.kl_divergence:
            continue
        # a subclass with its own kl_divergence is asked for it, not for the base class's problem
        problem = m.kl_problem() if type(m).kl_divergence is FactorizedLinear.kl_divergence else None
        if problem is None:
            terms.append(m.kl_divergence())
        else:
            problems.append(problem)
    return terms + grouped_kl(problems)


def sum_terms(terms: list[Tensor]) -> Tensor:
    """The sum of one or more scalar terms (one alone is returned as it is: no node added)."""
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def kl_divergence(model: nn.Module) -> Tensor:
    terms = kl_terms(model)
    return sum_terms(terms) if terms else torch.zeros(())


# ---------------------------------------------------------------------------------------------
# moving state by role
# ---------------------------------------------------------------------------------------------

def _tensors(model: nn.Module) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    return named


def _state_of(model: nn.Module, role: Role) -> dict[str, Tensor]:
    tensors = _tensors(model)
    manifest = manifest_of(model)
    return {e.name: tensors[e.name].detach().cpu().clone()
            for e in manifest.entries if e.role is role}


def _load_state_of(model: nn.Module, role: Role, state: dict[str, Tensor]) -> None:
    tensors = _tensors(model)
    expected = {e.name: e for e in manifest_of(model).entries if e.role is role}
    for name in sorted(set(expected) - set(state)):
        raise ValueError(f"{role.value} tensor {name!r} is missing from the state")
    for name in sorted(set(state) - set(expected)):
        raise ValueError(f"tensor {name!r} is not a {role.value} tensor of this model")
    # check everything before touching the model, so a bad state leaves it unchanged
    for name, entry in sorted(expected.items()):
        value = state[name]
        if not isinstance(value, Tensor):
            raise ValueError(f"tensor {name!r}: expected a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != entry.shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(value.shape)}, expected {entry.shape}")
        if dtype_name(value) != entry.dtype:
            raise ValueError(f"tensor {name!r}: dtype {dtype_name(value)}, expected {entry.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {name!r}: contains non-finite values")
    with torch.no_grad():
        for name in expected:
            tensors[name].copy_(state[name])


def shared_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of the SHARED tensors, keyed by full name."""
    return _state_of(model, Role.SHARED)


def load_shared_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Strict: exactly the shared names, exact shapes and dtypes, finite values."""
    _load_state_of(model, Role.SHARED, state)


def private_state(model: nn.Module) -> dict[str, Tensor]:
    return _state_of(model, Role.PRIVATE)


def load_private_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    _load_state_of(model, Role.PRIVATE, state)
