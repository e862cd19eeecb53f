"""Adapting the pretrained backbone at a site: adapters on its cross-modal linear layers.

`adapt_backbone` replaces selected nn.Linear layers by kt_core.factorized adapters built on the
pretrained weight (WAFFLe: W0 + W_a diag(r b) W_b with W_a = 0 at the start, LoRA: W0 + B A with
B = 0), so the adapted model starts as exactly the backbone's function. Everything else of the
backbone is frozen (requires_grad False), which the factor manifest reads as FROZEN: those tensors
come from the hosted checkpoint at every site and never travel, never appear in shared_state.
What does travel: the adapters' shared factors (and, with train_head, the small action head,
unless private_head keeps it at the site).

The adapters' own initial values come from AdapterConfig.seed, identical at every site.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, fields

from torch import nn

from kt_core.factorized import ADAPTERS, Adapter
from kt_core.manifest import Role
from kt_core.models import ModelConfig, layer_seed, make_adapter
from kt_core.vln.backbone import VLNBackbone

# Module-name patterns (fnmatch) of the linear layers to adapt. The default is every linear layer
# of the cross-modal layers: both cross-attentions and both streams' self-attention and FFN.
CROSS_MODAL = ("cross_layers.*",)
# only the cross-attentions: the cheapest useful choice (4 linear layers per cross-modal layer)
CROSS_ATTENTION = ("cross_layers.*.lang_cross.*", "cross_layers.*.vis_cross.*")


@dataclass(frozen=True)
class AdapterConfig:
    adapter: str = "waffle"            # waffle | lora | ffa_lora | dense
    targets: tuple[str, ...] = CROSS_MODAL
    train_head: bool = True         # the action head (d x 7) is trained and shared (dense FedAvg)
    # ... or trained and kept at the site (FedPer-style personal head). Sites holding different
    # levels need different actions (pickup, toggle, done): averaging their heads mixes those
    # action priors, and bench/vln_fed measured federated WAFFLe below local-only with a shared
    # head and above it with a private one (the numbers are in that benchmark's docstring).
    private_head: bool = False
    n_factors: int = 16
    ibp_alpha: float = 4.0
    temperature: float = 0.67
    gate_init: float = 1.0
    gate_lr_scale: float = 30.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.targets, (list, str)):
            object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))

    def model_config(self) -> ModelConfig:
        """The adapter fields in kt_core.models' config, so make_adapter builds the layers (and
        validates the numbers) exactly as it does for the image task."""
        cfg = ModelConfig(adapter=self.adapter, n_factors=self.n_factors, ibp_alpha=self.ibp_alpha,
                          temperature=self.temperature, gate_init=self.gate_init,
                          gate_lr_scale=self.gate_lr_scale, lora_rank=self.lora_rank,
                          lora_alpha=self.lora_alpha, seed=self.seed)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter: {self.adapter!r} is not one of {sorted(ADAPTERS)}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets: must be a non-empty list of module-name patterns, got {self.targets!r}")
        if not isinstance(self.train_head, bool):
            raise ValueError(f"train_head: must be true or false, got {self.train_head!r}")
        if not isinstance(self.private_head, bool):
            raise ValueError(f"private_head: must be true or false, got {self.private_head!r}")
        if self.private_head and not self.train_head:
            raise ValueError("private_head: needs train_head = true (a frozen head has nothing to personalize)")
        self.model_config()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"AdapterConfig: unknown field(s) {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


class PrivateHead(nn.Linear):
    """The action head kept at the site: a plain linear layer whose tensors the factor manifest
    reads as PRIVATE, so they are stored with the site's factor selection and never sent."""

    def tensor_roles(self) -> dict[str, Role]:
        return {"weight": Role.PRIVATE, "bias": Role.PRIVATE}


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the nn.Linear modules matching any pattern, in module order."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in targets)]


def adapt_backbone(model: VLNBackbone, cfg: AdapterConfig) -> VLNBackbone:
    """In place: freeze the backbone, then swap the target linear layers for adapters built on
    their weights. Returns the model. Raises ValueError when no layer matches the targets."""
    cfg.validate()
    names = target_linears(model, cfg.targets)
    if not names:
        raise ValueError(f"targets {list(cfg.targets)} match no linear layer of the backbone")
    for p in model.parameters():
        p.requires_grad_(False)
    model_cfg = cfg.model_config()
    for i, name in enumerate(names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear: nn.Linear = getattr(parent, attr)
        adapter = make_adapter(model_cfg, linear.in_features, linear.out_features, layer_seed(cfg.seed, i),
                               base=linear.weight.data, base_bias=None if linear.bias is None else linear.bias.data)
        setattr(parent, attr, adapter)
    if cfg.private_head:
        old = model.action_head
        head = PrivateHead(old.in_features, old.out_features, bias=old.bias is not None)
        head.load_state_dict(old.state_dict())
        model.action_head = head
    if cfg.train_head:
        for p in model.action_head.parameters():
            p.requires_grad_(True)
    return model


def adapters(model: nn.Module) -> dict[str, Adapter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Adapter)}
