"""A site's trainer for the navigation task: adapters on the hosted backbone, trained by behaviour
cloning on BabyAI demonstrations of this site's own levels.

Everything but the model and the data is LocalTrainer's: the round's update (shared factors
only), the private factor selection kept on disk, user-level DP (clip + noise) on the update.
Record-level DP-SGD is not offered for this task yet and is refused at start.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from kt_core import tasks
from kt_core.config import RunConfig
from kt_core.train import TrainResult
from kt_core.vln import finetune
from kt_core.vln.babyai import get_demos
from participant.trainer import LocalTrainer

log = logging.getLogger(__name__)


class VLNTrainer(LocalTrainer):
    def __init__(self, site: str, run_id: str, config: RunConfig, state_dir: Path, backbone: Path,
                 epsilon_budget: float | None = None):
        if config.privacy.enabled and config.privacy.mode == "dp_sgd":
            raise ValueError("privacy.mode: record-level DP-SGD is not offered for the vln task yet; use "
                             "user-level DP (mode central or distributed) or turn privacy off")
        self.backbone = Path(backbone)
        self.state_dir = Path(state_dir)
        super().__init__(site, run_id, config, state_dir, None, epsilon_budget)

    def _build_model(self) -> torch.nn.Module:
        built = tasks.build(self.config, self.backbone)
        self.tokenizer = built.tokenizer
        return built.model

    def _load_data(self, data_root: Path | None) -> None:
        vln, sites = self.config.vln, self.config.federation.sites
        index = sites.index(self.site)
        self.levels = finetune.assign_levels(vln.levels, len(sites))[index]
        cache = Path(vln.cache_dir).expanduser() if vln.cache_dir else self.state_dir / "demos"
        self.cache_dir = cache
        max_len = self.model.cfg.max_len
        train = finetune.site_data(index, self.levels, vln.episodes_per_level, cache)
        self.train_data = finetune.encode_demos(train, self.tokenizer, max_len)
        # unseen seeds of the same levels: the per-round accuracy the coordinator shows
        held = [get_demos(level, finetune.eval_seeds(vln.eval_episodes), cache) for level in self.levels]
        self.test_data = finetune.encode_demos(type(train).concat(held), self.tokenizer, max_len)
        log.info("%s: levels %s: %d training and %d evaluation steps of demonstrations", self.site,
                 ", ".join(self.levels), len(self.train_data), len(self.test_data))

    @property
    def num_samples(self) -> int:
        return len(self.train_data)

    def train(self, epochs: int, batch_size: int, lr: float, max_steps: int, seed: int, *,
              round_no: int = 0, task_id: str = "") -> TrainResult:
        cfg = dataclasses.replace(self.config.train, epochs=epochs, batch_size=batch_size, lr=lr,
                                  max_steps=max_steps or None, seed=seed)
        cfg.validate()
        return finetune.train_local(self.model, self.train_data, cfg)

    def evaluate(self) -> dict[str, float]:
        return finetune.evaluate(self.model, self.test_data)

    def final_evaluation(self) -> dict:
        """Rollouts on unseen seeds of this site's levels and of the held-out levels: success rate
        and SPL against the bot's path length."""
        vln = self.config.vln
        if not vln.rollout_episodes:
            return {}
        return finetune.site_evaluation(self.model, self.tokenizer, self.levels, vln.held_out_levels,
                                        vln.rollout_episodes, self.cache_dir)
