"""The site's model and data: load the global shared factors, train locally, produce the update.

The private factors (WAFFLe's factor selection) live here and on the site's disk, never on the wire.
With `[privacy] enabled` and mode "dp_sgd" every round is trained with DP-SGD (security.dp), after
the site's privacy ledger has reserved the round's epsilon; a round that would pass the budget
raises BudgetExceeded before any training.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kt_core import tasks
from kt_core.config import RunConfig
from kt_core.data import load_dataset, site_split
from kt_core.factorized import ADAPTERS
from kt_core.manifest import Role, manifest_of
from kt_core.models import (build_model, kl_divergence, load_private_state, load_shared_state, private_state,
                            shared_state)
from kt_core.train import TrainResult, evaluate, make_optimizer_for, train_local
from security.dp import BudgetExceeded, PrivacyLedger, RoundSpend, noise_multiplier_for
from security.dp import grad_samplers
from security.dp.ledger import LEDGER_FILE
from security.dp.engine import DPSettings, DPUnsupportedError, check_model, plan_round, train_dp
from security.dp.user_level import add_gaussian_noise, clip_update, distributed_share_std

log = logging.getLogger(__name__)

# per-sample gradient rules of the project's adapters (Opacus `hooks` mode)
SAMPLER_KINDS = {"waffle": "factorized", "lora": "lowrank", "ffa_lora": "lowrank", "dense": "linear"}
for _mode, _kind in SAMPLER_KINDS.items():
    grad_samplers.register(ADAPTERS[_mode], _kind)

__all__ = ["LocalTrainer", "BudgetExceeded", "DPUnsupportedError", "PrivacyState"]


@dataclass
class PrivacyState:
    """What this site enforces and reports."""
    budget: float
    noise_multiplier: float
    delta: float
    accountant: str
    spent: float = 0.0
    spent_rdp: float = 0.0


class LocalTrainer:
    def __init__(self, site: str, run_id: str, config: RunConfig, state_dir: Path, data_root: Path | None = None,
                 epsilon_budget: float | None = None):
        self.site = site
        self.run_id = run_id
        self.config = config
        self.model = self._build_model()
        self.manifest = manifest_of(self.model)
        self._load_data(data_root)
        self.private_path = Path(state_dir) / f"private-{run_id}.safetensors"
        if self.private_path.exists():
            try:
                load_private_state(self.model, load_file(str(self.private_path)))
                log.info("%s: restored private factors from %s", site, self.private_path)
            except (SafetensorError, OSError, ValueError) as err:
                raise ValueError(f"private state {self.private_path} is unusable: {err}") from None
        self.ledger: PrivacyLedger | None = None
        self.privacy: PrivacyState | None = None
        p = config.privacy
        if p.enabled and p.mode == "dp_sgd":
            self._setup_dp(Path(state_dir), epsilon_budget)
        elif epsilon_budget is not None and not p.enabled:
            log.warning("%s: --epsilon-budget given but the run does not enable [privacy]", site)

    def _build_model(self) -> torch.nn.Module:
        return build_model(self.config.model)

    def _load_data(self, data_root: Path | None) -> None:
        config, site = self.config, self.site
        data = load_dataset(config.data.dataset, root=data_root, max_train=config.data.max_train or None,
                            max_test=config.data.max_test or None)
        train_x, train_y, test_x, test_y = site_split(data, config.federation.sites, site, config.data.partition)
        if len(train_y) == 0:
            raise ValueError(f"site {site} received no training samples from the partition")
        self.train_x, self.train_y = torch.from_numpy(train_x), torch.from_numpy(train_y)
        self.test_x, self.test_y = torch.from_numpy(test_x), torch.from_numpy(test_y)
        log.info("%s: %d training and %d test samples (%s, %s)", site, len(train_y), len(test_y),
                 config.data.dataset, config.data.partition.scheme)

    # -- differential privacy ----------------------------------------------------------------------
    def _setup_dp(self, state_dir: Path, local_budget: float | None) -> None:
        p, t = self.config.privacy, self.config.train
        n = self.num_samples
        if p.delta >= 1.0 / n:
            raise ValueError(f"privacy.delta: {p.delta:g} is not below 1/N = 1/{n} for {self.site}'s {n} "
                             "training records (delta should be far below 1/N)")
        check_model(self.model, p.grad_sample_mode)   # DPUnsupportedError (a ValueError) names the layer
        budget = p.budget_for(self.site, local_budget)
        if budget is None:
            raise ValueError("privacy.epsilon_budget: no budget for this site")
        if p.noise_multiplier is not None:
            sigma = p.noise_multiplier
        else:
            # the whole run at this site's N reaches target_epsilon: every round spends the same
            plan = plan_round(n, t.batch_size, t.epochs, t.max_steps)
            sigma = noise_multiplier_for(p.target_epsilon, p.delta, plan.sample_rate,
                                         plan.steps * self.config.federation.rounds, p.accountant)
        self.ledger = PrivacyLedger(state_dir / LEDGER_FILE, self.site)
        spent = self.ledger.spent(p.delta)
        self.privacy = PrivacyState(budget=budget, noise_multiplier=sigma, delta=p.delta, accountant=p.accountant,
                                    spent=spent[p.accountant], spent_rdp=spent["rdp"])
        log.info("%s: DP-SGD on: noise multiplier %.4f, clip %.3g, delta %g, budget %.4g, spent so far %.4f "
                 "(%s; rdp %.4f), grad samples by %s", self.site, sigma, p.max_grad_norm, p.delta, budget,
                 self.privacy.spent, p.accountant, spent["rdp"], p.grad_sample_mode)
        if self.privacy.spent >= budget:
            log.error("%s: privacy budget already spent: epsilon %.4f >= budget %.4g; this site declines "
                      "every round", self.site, self.privacy.spent, budget)

    def train(self, epochs: int, batch_size: int, lr: float, max_steps: int, seed: int, *,
              round_no: int = 0, task_id: str = "") -> TrainResult:
        # The coordinator chooses these per round; everything else comes from the run config.
        cfg = dataclasses.replace(self.config.train, epochs=epochs, batch_size=batch_size, lr=lr,
                                  max_steps=max_steps or None, seed=seed)
        cfg.validate()
        if self.privacy is None:
            return train_local(self.model, self.train_x, self.train_y, cfg)
        return self._train_dp(cfg, round_no, task_id)

    def _train_dp(self, cfg, round_no: int, task_id: str) -> TrainResult:
        p, priv = self.config.privacy, self.privacy
        n = self.num_samples
        plan = plan_round(n, cfg.batch_size, cfg.epochs, cfg.max_steps)
        spend = RoundSpend(plan.sample_rate, priv.noise_multiplier, plan.steps)
        params = {"mode": p.mode, "grad_sample_mode": p.grad_sample_mode, "num_samples": n,
                  "batch_size": cfg.batch_size, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
                  "poisson_sampling": p.poisson_sampling, "max_physical_batch_size": p.max_physical_batch_size,
                  "target_epsilon": p.target_epsilon, "kl_weight": cfg.kl_weight}
        # raises BudgetExceeded, recording nothing, when this round would pass the budget
        entry = self.ledger.reserve(run_id=self.run_id, round_no=round_no, task_id=task_id, spend=spend,
                                    max_grad_norm=p.max_grad_norm, delta=p.delta, budget=priv.budget,
                                    accountant=p.accountant, params=params)
        public = self._public_params()
        public_ids = {id(q) for q in public}
        private = [q for q in self.model.parameters() if q.requires_grad and id(q) not in public_ids]
        kl_weight = cfg.kl_weight

        def kl_term():
            # The ELBO's KL term depends on the variational parameters only, never on a record:
            # its gradient is post-processing of the DP output and costs no privacy. The 1/N
            # scaling uses the same N the sampling rate comes from (treated as public, as Opacus does).
            return kl_weight * kl_divergence(self.model) / n

        result = train_dp(self.model, self.train_x, self.train_y, loss_fn=F.cross_entropy,
                          optimizer=make_optimizer_for(private, cfg),
                          settings=DPSettings(noise_multiplier=priv.noise_multiplier, max_grad_norm=p.max_grad_norm,
                                              batch_size=cfg.batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps,
                                              grad_sample_mode=p.grad_sample_mode,
                                              max_physical_batch_size=p.max_physical_batch_size,
                                              poisson=p.poisson_sampling),
                          public_loss=kl_term if kl_weight else None, public_params=public,
                          public_optimizer=make_optimizer_for(public, cfg) if public else None, seed=cfg.seed)
        entry = self.ledger.settle(entry, result.steps)
        priv.spent = entry.eps_cum()
        priv.spent_rdp = entry.eps_cum_rdp
        self.last_entry = entry
        return TrainResult(num_samples=n, steps=result.steps, loss=result.loss, seconds=result.seconds)

    def _public_params(self) -> list[torch.nn.Parameter]:
        """Parameters the data loss never touches (only data-independent terms, e.g. WAFFLe's
        Kumaraswamy stick parameters, which appear in the KL alone): found by one probe backward."""
        was = self.model.training
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            F.cross_entropy(self.model(self.train_x[:2]), self.train_y[:2]).backward()
        public = [q for q in self.model.parameters() if q.requires_grad and q.grad is None]
        self.model.zero_grad(set_to_none=True)
        self.model.train(was)
        return public

    def privacy_metrics(self) -> dict[str, float]:
        if self.privacy is None:
            return {}
        priv, p = self.privacy, self.config.privacy
        metrics = {"epsilon": priv.spent, "epsilon_rdp": priv.spent_rdp, "epsilon_budget": priv.budget,
                   "delta": priv.delta, "noise_multiplier": priv.noise_multiplier, "max_grad_norm": p.max_grad_norm}
        entry = getattr(self, "last_entry", None)
        if entry is not None:
            metrics.update(epsilon_round=entry.eps_round_prv if entry.accountant == "prv" else entry.eps_round_rdp,
                           sample_rate=entry.sample_rate, dp_steps=float(entry.steps))
        return metrics

    # -- state -------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.train_y)

    def shared_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, shape) of every tensor the manifest declares shared."""
        return {e.name: (e.dtype, tuple(e.shape)) for e in self.manifest.entries if e.role == Role.SHARED}

    def load_global(self, state: dict[str, np.ndarray]) -> None:
        load_shared_state(self.model, {n: torch.from_numpy(np.array(a)) for n, a in state.items()})

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.test_x, self.test_y)

    def update(self, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Delta of the shared tensors since `base`: what this site contributes to the round.

        User-level DP (central / distributed): the whole update is clipped to update_clip_norm;
        distributed mode also adds this site's share of the noise (see security/dp/user_level.py)."""
        update = {n: t.numpy() - base[n] for n, t in shared_state(self.model).items()}
        p = self.config.privacy
        if p.enabled and p.mode in ("central", "distributed"):
            update, norm = clip_update(update, p.update_clip_norm)
            self.last_update_norm = norm
            if p.mode == "distributed":
                std = distributed_share_std(p.user_noise_multiplier, p.update_clip_norm, p.min_survivors)
                update = add_gaussian_noise(update, std)
        return update

    def private_tensors(self) -> dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in private_state(self.model).items()}

    # -- the end of the run -------------------------------------------------------------------------
    def conclude(self, state_dir: Path, final: tuple[str, dict[str, np.ndarray]] | None, *, round_no: int,
                 reason: str) -> Path | None:
        """At RunFinished: keep the private factors; with the run's final global state (digest,
        tensors) load it and write the site's adapted model, STATE/adapted-<run>.safetensors
        (kt_core.tasks.save_adapted: what a site distills its student from); then the final
        evaluation (VLN), of that model, to STATE/evaluation-<run>.json. Returns the adapted
        model's path (None without the final state: no file then, since the last local model
        is not the federation's)."""
        self.save_private()
        path = None
        if final is not None:
            digest, state = final
            self.load_global(state)
            path = tasks.adapted_path(state_dir, self.run_id)
            tasks.save_adapted(path, self.model, self.config, site=self.site, levels=getattr(self, "levels", ()),
                               run_id=self.run_id, round_no=round_no, global_state_digest=digest, reason=reason)
            log.info("%s: adapted model (final global state %s… after round %d + private factors) written to %s",
                     self.site, digest[:16], round_no, path)
        result = self.final_evaluation()
        if result:
            result["model"] = ("final global state + private factors" if final is not None
                               else "last local model (the final global state was not available)")
            result["global_state_digest"] = final[0] if final is not None else None
            out = Path(state_dir) / f"evaluation-{self.run_id}.json"
            out.write_text(json.dumps(result, indent=2, sort_keys=True))
            held = result["held_out_success_rate"]
            log.info("%s: final evaluation on unseen seeds: success rate %.3f, SPL %.3f on its levels; held-out "
                     "levels: success rate %s (%s)", self.site, result["success_rate"], result["spl"],
                     "n/a" if held is None else f"{held:.3f}", out)
        return path

    def final_evaluation(self) -> dict:
        """Task-specific evaluation at the end of the run ({} : none for the image task)."""
        return {}

    def save_private(self) -> None:
        tmp = self.private_path.with_suffix(".tmp")
        self.private_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in private_state(self.model).items()}, str(tmp))
        os.replace(tmp, self.private_path)
