"""The navigation task: adapters on the hosted VLN backbone (frozen), trained by behaviour
cloning on BabyAI demonstrations of this site's own levels (kt_core.vln).

The backbone travels once (digest-checked, cached by digest), only the adapters' shared factors
every round. Record-level DP-SGD is not offered for this task yet: a run asking for it is refused
at the site; user-level DP (clip + noise on the whole update) is.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from kt_core.config import ConfigError
from kt_core.tasks import SiteData, Task, TaskModel
from kt_core.train import TrainConfig, TrainResult

log = logging.getLogger(__name__)


class NavTask(Task):
    kind = "vln"
    hosts_backbone = True
    record_level_dp = False

    def build(self, backbone: Path | None = None) -> TaskModel:
        from kt_core.vln.adapt import adapt_backbone
        from kt_core.vln.checkpoint import CheckpointError, load_backbone

        if backbone is None:
            raise ConfigError("vln.backbone: the run adapts a hosted backbone, but no checkpoint was given")
        try:
            loaded = load_backbone(backbone, sha256=self.config.vln.backbone_sha256 or None)
        except CheckpointError as err:
            raise ConfigError(f"vln.backbone: {err}") from None
        try:
            model = adapt_backbone(loaded.model, self.config.vln.adapter)
        except ValueError as err:
            raise ConfigError(f"vln.adapter.{err}") from None
        return TaskModel(model, loaded.tokenizer)

    def check(self) -> None:
        """Every level the run names exists (minigrid is imported only for a VLN run)."""
        from kt_core.vln.babyai import BabyAIError, check_level
        from kt_core.vln.finetune import assign_levels

        config = self.config
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

    def backbone_sha256(self) -> str:
        return self.config.vln.backbone_sha256

    def site_data(self, built: TaskModel, site: str, *, data_root: Path | None, state_dir: Path) -> SiteData:
        from kt_core.vln import finetune
        from kt_core.vln.babyai import get_demos

        vln, sites = self.config.vln, self.config.federation.sites
        index = sites.index(site)
        levels = finetune.assign_levels(vln.levels, len(sites))[index]
        cache = Path(vln.cache_dir).expanduser() if vln.cache_dir else Path(state_dir) / "demos"
        max_len = built.model.cfg.max_len
        train = finetune.site_data(index, levels, vln.episodes_per_level, cache)
        train_data = finetune.encode_demos(train, built.tokenizer, max_len)
        # unseen seeds of the same levels: the per-round accuracy the coordinator shows
        held = [get_demos(level, finetune.eval_seeds(vln.eval_episodes), cache) for level in levels]
        test_data = finetune.encode_demos(type(train).concat(held), built.tokenizer, max_len)
        log.info("%s: levels %s: %d training and %d evaluation steps of demonstrations", site,
                 ", ".join(levels), len(train_data), len(test_data))
        return SiteData(train=train_data, test=test_data, num_samples=len(train_data), levels=tuple(levels),
                        cache_dir=cache)

    def train(self, model: nn.Module, data: SiteData, cfg: TrainConfig) -> TrainResult:
        from kt_core.vln import finetune

        return finetune.train_local(model, data.train, cfg)

    def evaluate(self, model: nn.Module, data: SiteData) -> dict[str, float]:
        from kt_core.vln import finetune

        return finetune.evaluate(model, data.test)

    def final_evaluation(self, built: TaskModel, data: SiteData) -> dict:
        """Rollouts on unseen seeds of this site's levels and of the held-out levels: success rate
        and SPL against the bot's path length."""
        from kt_core.vln import finetune

        vln = self.config.vln
        if not vln.rollout_episodes:
            return {}
        return finetune.site_evaluation(built.model, built.tokenizer, list(data.levels), vln.held_out_levels,
                                        vln.rollout_episodes, data.cache_dir)

    def describe_final(self, result: dict) -> str:
        held = result["held_out_success_rate"]
        return (f"on unseen seeds: success rate {result['success_rate']:.3f}, SPL {result['spl']:.3f} on its levels; "
                f"held-out levels: success rate {'n/a' if held is None else f'{held:.3f}'}")

    def report_final(self, evaluations: dict[str, dict]) -> list[str]:
        """Each site's rollouts on unseen seeds after the run (its own levels and the held-out ones)."""
        out = []
        for site, r in evaluations.items():
            held = r.get("held_out_success_rate")
            out.append(f"  {site}: success rate {r['success_rate']:.2f}, SPL {r['spl']:.2f} on unseen seeds of "
                       f"{', '.join(r['train_levels'])}" + (f"; held-out levels: success rate {held:.2f}"
                                                            if held is not None else ""))
        if out:
            out.insert(0, f"navigation after the run ({self.config.vln.rollout_episodes} unseen episodes per "
                          "level, greedy policy; SPL against the expert bot's path):")
        return out

    def dense_update_bytes(self) -> int:
        """Every weight of the backbone, as full fine-tuning would send."""
        import math

        from safetensors import safe_open

        with safe_open(self.config.vln.backbone, framework="np") as f:
            return sum(4 * math.prod(int(d) for d in f.get_slice(k).get_shape()) for k in f.keys())
