"""The built-in navigation task: adapters on the hosted VLN backbone (frozen), trained by
behaviour cloning on BabyAI demonstrations of this site's own levels (kt_core.vln), as a
FederatedTask like any federation's own.

What it does beyond the common case of kt_core.task_api, through the API's optional hooks:
  options           the run config itself ([vln]: levels, demonstrations, adapters, rollouts)
  hosts_backbone    the coordinator hosts the pretrained backbone; a site downloads it once
                    (digest-checked, cached by digest) and `build_model` loads it from there; only
                    the adapters' shared factors travel every round
  adapt             adapters on the backbone's cross-modal layers ([vln.adapter], kt_core.vln.adapt),
                    with the action head trained, shared or kept at the site
  local_data        this site's levels dealt round-robin from [vln] levels, its demonstrations on its
                    own seed block; unseen seeds of the same levels are its test set
  loss, evaluate    cross-entropy of the expert's next action; evaluation on an inference copy with
                    the adapters folded in
  final_evaluation  greedy rollouts on unseen seeds of its levels and of the held-out levels
Its loss is not the default (x, y) one, so record-level DP-SGD is not offered for this task yet: a
run asking for it is refused at the site; user-level DP (clip + noise on the whole update) is.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.config import ConfigError
from kt_core.config_file import RunUnworkable
from kt_core.task_api import FederatedTask, LocalData, SiteContext

log = logging.getLogger(__name__)


class NavTask(FederatedTask):
    name = "vln"
    version = "1"
    reads_site_data = False   # demonstrations come from the BabyAI bot, on the site's own seed block
    hosts_backbone = True

    def __init__(self, options):
        super().__init__(options)
        self.max_len = 0   # the backbone's instruction length, known once build_model loaded it
        self.memory = 0    # and the past steps it sees (kt_core.vln.memory)

    @classmethod
    def options_from(cls, config):
        return config

    def build_model(self, backbone: Path | None = None) -> nn.Module:
        from kt_core.vln.checkpoint import CheckpointError, load_backbone

        if backbone is None:
            raise ConfigError("vln.backbone: the run adapts a hosted backbone, but no checkpoint was given")
        try:
            loaded = load_backbone(backbone, sha256=self.options.vln.backbone_sha256 or None,
                                   memory=self.options.vln.memory)
        except CheckpointError as err:
            raise ConfigError(f"vln.backbone: {err}") from None
        self.tokenizer, self.max_len = loaded.tokenizer, loaded.model.cfg.max_len
        self.memory = loaded.model.cfg.memory
        return loaded.model

    def adapt(self, model: nn.Module, settings, targets) -> list[str]:
        from kt_core.vln.adapt import adapt_backbone, adapters

        try:
            adapt_backbone(model, self.options.vln.adapter)
        except ValueError as err:
            raise ConfigError(f"vln.adapter.{err}") from None
        return list(adapters(model))

    def check(self) -> None:
        """Every level the run names exists (minigrid is imported only for a VLN run)."""
        from kt_core.vln.babyai import BabyAIError, check_level
        from kt_core.vln.finetune import assign_levels

        config = self.options
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
        return self.options.vln.backbone_sha256

    def _cache(self, site: SiteContext) -> Path:
        vln = self.options.vln
        return Path(vln.cache_dir).expanduser() if vln.cache_dir else Path(site.state_dir) / "demos"

    def local_data(self, site: SiteContext) -> LocalData:
        from kt_core.vln import finetune
        from kt_core.vln.babyai import get_demos
        from kt_core.vln.tokenizer import TokenizerError

        if self.tokenizer is None:
            raise ValueError("local_data: the backbone (and its tokenizer) is loaded by build_model first")
        vln = self.options.vln
        levels = finetune.assign_levels(vln.levels, len(site.sites))[site.index]
        cache, max_len, memory = self._cache(site), self.max_len, self.memory
        try:
            # the rollouts' instructions first: env resets only, before any bot runs
            finetune.check_rollout_instructions(self.tokenizer, max_len, [*levels, *vln.held_out_levels],
                                                max(vln.rollout_episodes, vln.round_rollout_episodes))
            train = finetune.site_data(site.index, levels, vln.episodes_per_level, cache)
            train_data = finetune.encode_demos(train, self.tokenizer, max_len, memory)
            # unseen seeds of the same levels: the per-round accuracy the coordinator shows
            held = [get_demos(level, finetune.eval_seeds(vln.eval_episodes), cache) for level in levels]
            test_data = finetune.encode_demos(type(train).concat(held), self.tokenizer, max_len, memory)
        except TokenizerError as err:
            # a cut instruction is another instruction (kt_core.vln.tokenizer): the run's levels do
            # not fit this backbone, and this site cannot take part (the instructions come from the
            # public level generators, not from anything of the site's)
            raise RunUnworkable(f"vln.levels: {err}") from None
        log.info("%s: levels %s: %d training and %d evaluation steps of demonstrations", site.name,
                 ", ".join(levels), len(train_data), len(test_data))
        return LocalData(train=train_data, test=test_data, levels=tuple(levels))

    def loss(self, model: nn.Module, batch) -> Tensor:
        tokens, images, directions, actions = batch
        return F.cross_entropy(model.act(tokens, images, directions), actions)

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Accuracy of predicting the expert's action and mean cross-entropy, on an inference copy
        (adapters folded in: what the rollouts run)."""
        from kt_core.vln.finetune import action_metrics, inference_copy

        return action_metrics(inference_copy(model), batches)

    def round_metrics(self, model: nn.Module, site: SiteContext, data: LocalData) -> dict[str, float]:
        """The success rate of greedy rollouts on unseen seeds of the site's levels (`[vln]
        round_rollout_episodes` per level; none at 0): what the demo plots per round."""
        from kt_core.vln import finetune

        episodes = self.options.vln.round_rollout_episodes
        if not episodes:
            return {}
        rates = [finetune.evaluate_rollouts(model, self.tokenizer, level, episodes, self._cache(site))["success_rate"]
                 for level in data.levels]
        return {"success_rate": float(sum(rates) / len(rates))}

    def final_evaluation(self, model: nn.Module, site: SiteContext, data: LocalData) -> dict:
        """Rollouts on unseen seeds of this site's levels and of the held-out levels: success rate
        and SPL against the bot's path length."""
        from kt_core.vln import finetune

        vln = self.options.vln
        if not vln.rollout_episodes:
            return {}
        return finetune.site_evaluation(model, self.tokenizer, list(data.levels), vln.held_out_levels,
                                        vln.rollout_episodes, self._cache(site))

    def describe_final(self, result: dict) -> str:
        if "success_rate" not in result:   # no rollouts configured: the test split's metrics alone
            return super().describe_final(result)
        held = result["held_out_success_rate"]
        return (f"on unseen seeds: success rate {result['success_rate']:.3f}, SPL {result['spl']:.3f} on its levels; "
                f"held-out levels: success rate {'n/a' if held is None else f'{held:.3f}'}")

    def report_final(self, evaluations: dict[str, dict]) -> list[str]:
        """Each site's rollouts on unseen seeds after the run (its own levels and the held-out ones)."""
        out = []
        for site, r in evaluations.items():
            if "success_rate" not in r:
                continue
            held = r.get("held_out_success_rate")
            out.append(f"  {site}: success rate {r['success_rate']:.2f}, SPL {r['spl']:.2f} on unseen seeds of "
                       f"{', '.join(r['train_levels'])}" + (f"; held-out levels: success rate {held:.2f}"
                                                            if held is not None else ""))
        if out:
            out.insert(0, f"navigation after the run ({self.options.vln.rollout_episodes} unseen episodes per "
                          "level, greedy policy; SPL against the expert bot's path):")
        return out

    def dense_update_bytes(self) -> int:
        """Every weight of the backbone, as full fine-tuning would send."""
        import math

        from safetensors import safe_open

        with safe_open(self.options.vln.backbone, framework="np") as f:
            return sum(4 * math.prod(int(d) for d in f.get_slice(k).get_shape()) for k in f.keys())
