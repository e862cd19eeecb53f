"""What a run learns, built the same way at the coordinator and at every site.

The coordinator builds the model once to know the factor manifest and the round-0 shared state;
each site builds the identical model (same seeds) and adds its private parts. For the "vln" task
the model is the hosted backbone, frozen, with adapters on its linear layers: the backbone
travels once (digest-checked, cached by digest), only the adapters' shared factors every round.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kt_core.config import ConfigError, RunConfig
from kt_core.models import build_model


@dataclass
class TaskModel:
    model: nn.Module
    tokenizer: object | None = None   # the VLN backbone's mission tokenizer


def build(config: RunConfig, backbone: Path | None = None) -> TaskModel:
    """The run's model. For "vln", `backbone` is the checkpoint file whose SHA-256 the run names
    (config.vln.backbone_sha256); a file with another digest or architecture is refused."""
    if config.task.kind == "image":
        return TaskModel(build_model(config.model))
    from kt_core.vln.adapt import adapt_backbone
    from kt_core.vln.checkpoint import CheckpointError, load_backbone

    if backbone is None:
        raise ConfigError("vln.backbone: the run adapts a hosted backbone, but no checkpoint was given")
    try:
        loaded = load_backbone(backbone, sha256=config.vln.backbone_sha256 or None)
    except CheckpointError as err:
        raise ConfigError(f"vln.backbone: {err}") from None
    try:
        model = adapt_backbone(loaded.model, config.vln.adapter)
    except ValueError as err:
        raise ConfigError(f"vln.adapter.{err}") from None
    return TaskModel(model, loaded.tokenizer)


def check_levels(config: RunConfig) -> None:
    """Every level the run names exists (minigrid is imported only for a VLN run)."""
    if config.task.kind != "vln":
        return
    from kt_core.vln.babyai import BabyAIError, check_level
    from kt_core.vln.finetune import assign_levels

    for field in ("levels", "held_out_levels"):
        for level in getattr(config.vln, field):
            try:
                check_level(level)
            except BabyAIError as err:
                raise ConfigError(f"vln.{field}: {err}") from None
    try:
        assign_levels(config.vln.levels, len(config.federation.sites))
    except ValueError as err:
        raise ConfigError(f"vln.levels: {err}") from None


def with_backbone_digest(config: RunConfig, sha256: str) -> RunConfig:
    return dataclasses.replace(config, vln=dataclasses.replace(config.vln, backbone_sha256=sha256))
