"""The site's privacy engine: everything this site enforces about what its data may reveal.

Like Opacus' PrivacyEngine it is made once (per run) and then asked to train and to protect:

    privacy = SitePrivacy(site, run_id, config, task, state_dir=..., num_samples=N, ...)
    privacy.next_attempt(r, t)                                            # what became of earlier attempts
    result = privacy.train(model, data, cfg, round_no=r, attempt_id=t)   # raises BudgetExceeded
    privacy.decline(err, round_no=r, attempt_id=t)                        # the hard stop, recorded
    update = privacy.protect_update(update)                            # user-level clip (+ noise)
    privacy.released(t) | privacy.release_later(t, sent) | privacy.withhold(t, why)
    privacy.metrics()                                                  # what the site reports

It owns the site's privacy ledger (security.dp.ledger: the budget check before training, the spend
after it, the declines), record-level DP-SGD (security.dp.engine, after the ledger has reserved the
round's epsilon) and user-level DP on the update (security.dp.user_level); each DP round's ledger
row also goes into the site's audit trail. A round that would pass the budget raises
BudgetExceeded before any training. Nothing outside this module reads the ledger's rows.

Epsilon is spent on what leaves the site, not on training alone. After DP-SGD the engine keeps the
model as it was before that attempt until the round says what became of the update: `released`
(it goes to the coordinator: the row stays spent), `release_later` (secure aggregation: the update
leaves with the masked input, a later step; the session is asked when the attempt is over) or
`withhold` (nothing derived from it leaves: the model goes back to before the training, and the
row is withheld, epsilon 0). An attempt whose fate the site cannot tell (a crash, an error) stays
spent. When a retry of a round arrives, the earlier attempts of that round are marked aborted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kt_core.config import RunConfig
from kt_core.config_file import RunUnworkable
from kt_core.factorized import ADAPTERS
from kt_core.models import kl_divergence
from kt_core.task_runner import TaskRunner
from kt_core.tasks import SiteData
from kt_core.train import TrainConfig, TrainResult, make_optimizer_for
from participant.audit_trail import NoAudit
from security.dp import BudgetExceeded, LedgerEntry, PrivacyLedger, RoundSpend, noise_multiplier_for
from security.dp.accounting import AccountingError
from security.dp import grad_samplers
from security.dp.engine import DPSettings, check_model, plan_round, train_dp
from security.dp.ledger import LEDGER_FILE
from security.dp.user_level import add_gaussian_noise, clip_update, distributed_share_std

log = logging.getLogger(__name__)

# per-sample gradient rules of the project's adapters (Opacus `hooks` mode)
SAMPLER_KINDS = {"waffle": "factorized", "lora": "lowrank", "ffa_lora": "lowrank", "dense": "linear"}
for _mode, _kind in SAMPLER_KINDS.items():
    grad_samplers.register(ADAPTERS[_mode], _kind)

__all__ = ["SitePrivacy", "BudgetExceeded"]


@dataclass
class _RecordLevel:
    """Record-level DP-SGD as this site runs it: its ledger and what it has spent."""
    ledger: PrivacyLedger
    budget: float
    noise_multiplier: float
    delta: float
    accountant: str
    spent: float = 0.0
    spent_rdp: float = 0.0
    last: LedgerEntry | None = None     # the last round's settled row (what the site reports)


@dataclass
class _Unreleased:
    """The last attempt this site trained whose update has not left yet: what undoing it needs."""
    entry: LedgerEntry
    model: nn.Module
    before: dict[str, torch.Tensor]            # the model's state before this attempt's DP-SGD
    sent: Callable[[], bool] | None = None     # secure aggregation: did the masked input go out?


class SitePrivacy:
    def __init__(self, site: str, run_id: str, config: RunConfig, task: TaskRunner, *, state_dir: Path,
                 num_samples: int, model: nn.Module, local_budget: float | None = None, audit=None):
        """Checks the run's privacy settings against this site (raises RunUnworkable, naming the
        setting, when this site cannot honour them) and opens its ledger for DP-SGD."""
        self.check_offered(config, task)
        self.site, self.run_id, self.config = site, run_id, config
        self.audit = audit if audit is not None else NoAudit()
        self.num_samples = num_samples
        p = config.privacy
        self.record: _RecordLevel | None = None
        self.unreleased: _Unreleased | None = None
        if p.enabled and p.mechanism == "dp_sgd":
            self.record = self._open_record_level(Path(state_dir), model, local_budget)
        elif local_budget is not None and not p.enabled:
            log.warning("%s: --epsilon-budget given but the run does not enable [privacy]", site)

    @staticmethod
    def check_offered(config: RunConfig, task: TaskRunner) -> None:
        """Refuse, before anything is built, a privacy mechanism the run's task does not offer."""
        p = config.privacy
        if p.enabled and p.mechanism == "dp_sgd" and not task.record_level_dp:
            raise RunUnworkable(f"privacy.mechanism: record-level DP-SGD is not offered for the {task.kind} task "
                                "yet; use user-level DP (mechanism central or distributed) or turn privacy off")

    # -- what the site reads ---------------------------------------------------------------------
    @property
    def budget(self) -> float | None:
        return self.record.budget if self.record else None

    @property
    def noise_multiplier(self) -> float | None:
        """DP-SGD's noise multiplier at this site (None without record-level DP)."""
        return self.record.noise_multiplier if self.record else None

    @property
    def ledger(self) -> PrivacyLedger | None:
        return self.record.ledger if self.record else None

    def metrics(self) -> dict[str, float]:
        rec, p = self.record, self.config.privacy
        if rec is None:
            return {}
        metrics = {"epsilon": rec.spent, "epsilon_rdp": rec.spent_rdp, "epsilon_budget": rec.budget,
                   "delta": rec.delta, "noise_multiplier": rec.noise_multiplier, "max_grad_norm": p.max_grad_norm}
        if rec.last is not None:
            entry = rec.last
            metrics.update(epsilon_round=entry.eps_round_prv if entry.accountant == "prv" else entry.eps_round_rdp,
                           sample_rate=entry.sample_rate, dp_steps=float(entry.steps))
        return metrics

    # -- setting up record-level DP -------------------------------------------------------------
    def _open_record_level(self, state_dir: Path, model: nn.Module, local_budget: float | None) -> _RecordLevel:
        p, t, n = self.config.privacy, self.config.train, self.num_samples
        # what the coordinator is told of a refusal here names the setting, never this site's N
        if p.delta >= 1.0 / n:
            raise RunUnworkable(f"privacy.delta: {p.delta:g} is not below 1/N = 1/{n} for {self.site}'s {n} "
                                "training records (delta should be far below 1/N)",
                                public=f"privacy.delta: {p.delta:g} is not below 1/N for this site's training records")
        try:
            check_model(model, p.grad_sample_mode)   # DPUnsupportedError names the layer
        except ValueError as err:
            raise RunUnworkable(f"privacy.grad_sample_mode: {err}") from None
        budget = p.budget_for(self.site, local_budget)
        if budget is None:
            raise RunUnworkable("privacy.epsilon_budget: no budget for this site")
        if p.noise_multiplier is not None:
            sigma = p.noise_multiplier
        else:
            # the whole run at this site's N reaches target_epsilon: every round spends the same
            plan = plan_round(n, t.batch_size, t.epochs, t.max_steps)
            try:
                sigma = noise_multiplier_for(p.target_epsilon, p.delta, plan.sample_rate,
                                             plan.steps * self.config.federation.rounds, p.accountant)
            except AccountingError as err:
                raise RunUnworkable(
                    f"privacy.target_epsilon: {err}",
                    public=f"privacy.target_epsilon: no noise multiplier reaches epsilon {p.target_epsilon:g} at delta "
                           f"{p.delta:g} over the run's {self.config.federation.rounds} rounds at this site's "
                           "sample rate") from None
        ledger = PrivacyLedger(state_dir / LEDGER_FILE, self.site)
        spent = ledger.spent(p.delta)
        rec = _RecordLevel(ledger, budget=budget, noise_multiplier=sigma, delta=p.delta, accountant=p.accountant,
                           spent=spent[p.accountant], spent_rdp=spent["rdp"])
        log.info("%s: DP-SGD on: noise multiplier %.4f, clip %.3g, delta %g, budget %.4g, spent so far %.4f "
                 "(%s; rdp %.4f), grad samples by %s", self.site, sigma, p.max_grad_norm, p.delta, budget,
                 rec.spent, p.accountant, spent["rdp"], p.grad_sample_mode)
        if rec.spent >= budget:
            log.error("%s: privacy budget already spent: epsilon %.4f >= budget %.4g; this site declines "
                      "every round", self.site, rec.spent, budget)
        return rec

    # -- training ---------------------------------------------------------------------------------
    def train(self, task: TaskRunner, model: nn.Module, data: SiteData, cfg: TrainConfig, *, round_no: int,
              attempt_id: str, optimizer=None) -> TrainResult:
        """One round of local training: the task's own loop (with the site's kept `optimizer`, if
        any), or DP-SGD after the ledger reserved the round (BudgetExceeded, recording nothing,
        when the round would pass the budget), whose optimizer is its own every round."""
        if self.record is None:
            return task.train(model, data, cfg, optimizer=optimizer)
        rec, p, n = self.record, self.config.privacy, self.num_samples
        plan = plan_round(n, cfg.batch_size, cfg.epochs, cfg.max_steps)
        params = {"mechanism": p.mechanism, "grad_sample_mode": p.grad_sample_mode, "num_samples": n,
                  "batch_size": cfg.batch_size, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
                  "poisson_sampling": p.poisson_sampling, "max_physical_batch_size": p.max_physical_batch_size,
                  "target_epsilon": p.target_epsilon, "kl_weight": cfg.kl_weight}
        entry = rec.ledger.reserve(run_id=self.run_id, round_no=round_no, attempt_id=attempt_id,
                                   spend=RoundSpend(plan.sample_rate, rec.noise_multiplier, plan.steps),
                                   max_grad_norm=p.max_grad_norm, delta=p.delta, budget=rec.budget,
                                   accountant=p.accountant, params=params)
        x, y = task.dp_records(data)
        before = {name: value.detach().clone() for name, value in model.state_dict().items()}
        try:
            result = self._dp_sgd(model, x, y, cfg)
        except FloatingPointError:
            # the noisy steps ran, and that they diverged is reported (derived from them): the
            # round counts as spent, as reserved
            self._note(rec.ledger.settle(entry, entry.steps))
            raise
        entry = rec.ledger.settle(entry, result.steps)
        self._note(entry)
        self.unreleased = _Unreleased(entry, model, before)
        return TrainResult(num_samples=n, steps=result.steps, loss=result.loss, seconds=result.seconds)

    def _dp_sgd(self, model: nn.Module, x, y, cfg: TrainConfig):
        p, n = self.config.privacy, self.num_samples
        public = public_params(model, x, y)
        public_ids = {id(q) for q in public}
        private = [q for q in model.parameters() if q.requires_grad and id(q) not in public_ids]
        kl_weight = cfg.kl_weight

        def kl_term():
            # The ELBO's KL term depends on the variational parameters only, never on a record:
            # its gradient is post-processing of the DP output and costs no privacy. The 1/N
            # scaling uses the same N the sampling rate comes from (treated as public, as Opacus does).
            return kl_weight * kl_divergence(model) / n

        settings = DPSettings(noise_multiplier=self.record.noise_multiplier, max_grad_norm=p.max_grad_norm,
                              batch_size=cfg.batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps,
                              grad_sample_mode=p.grad_sample_mode, max_physical_batch_size=p.max_physical_batch_size,
                              poisson=p.poisson_sampling)
        return train_dp(model, x, y, loss_fn=F.cross_entropy, optimizer=make_optimizer_for(private, cfg),
                        settings=settings, public_loss=kl_term if kl_weight else None, public_params=public,
                        public_optimizer=make_optimizer_for(public, cfg) if public else None, seed=cfg.seed)

    def decline(self, err: BudgetExceeded, *, round_no: int, attempt_id: str) -> None:
        """Record the refusal of a round (the hard stop) in the ledger."""
        self.record.ledger.record_decline(run_id=self.run_id, round_no=round_no, attempt_id=attempt_id, reason=str(err),
                                          spent=err.spent, would_be=err.would_be, budget=err.budget,
                                          accountant=self.record.accountant)

    def _note(self, entry: LedgerEntry) -> None:
        """A ledger row changed: what the site reports, and its audit trail."""
        rec = self.record
        rec.spent, rec.spent_rdp, rec.last = entry.eps_cum(), entry.eps_cum_rdp, entry
        self.audit.dp_ledger(entry)

    # -- what became of an attempt's update -------------------------------------------------------
    def released(self, attempt_id: str) -> None:
        """The attempt's update leaves the site now: its row stays spent, whatever the coordinator
        then makes of the attempt."""
        if self.unreleased is not None and self.unreleased.entry.attempt_id == attempt_id:
            self.unreleased = None

    def release_later(self, attempt_id: str, sent: Callable[[], bool]) -> None:
        """Under secure aggregation the update leaves with the masked input, a step the coordinator
        opens later: `sent()` says, once the attempt is over, whether it got that far."""
        if self.unreleased is not None and self.unreleased.entry.attempt_id == attempt_id:
            self.unreleased.sent = sent

    def withhold(self, attempt_id: str, why: str) -> bool:
        """Nothing derived from the attempt's training leaves the site: the model goes back to
        before it and the ledger row is withheld (epsilon 0). True when the model was restored
        (the caller keeps the private factors on disk as they now are)."""
        u = self.unreleased
        if u is None or u.entry.attempt_id != attempt_id:
            return False
        self.unreleased = None
        u.model.load_state_dict(u.before)
        entry = self.record.ledger.withhold(u.entry, why)
        self._note(entry)
        log.info("%s: round %d: update not released (%s): DP-SGD undone, epsilon stays %.4f", self.site,
                 entry.round, why, entry.eps_cum())
        return True

    def next_attempt(self, round_no: int, attempt_id: str) -> bool:
        """An assignment arrived: an earlier attempt is over. Its update, if secure aggregation never sent
        it, is withheld; the earlier attempts of this round were aborted (this is their retry).
        True when the model was restored (see withhold)."""
        if self.record is None:
            return False
        restored = self._settle_unreleased(f"the attempt ended before its masked input was sent "
                                           f"(an assignment for round {round_no} arrived)")
        for e in self.record.ledger.mark_aborted(run_id=self.run_id, round_no=round_no, keep_attempt_id=attempt_id,
                                                 note=f"attempt aborted: round {round_no} was retried"):
            log.info("%s: round %d: attempt %s was aborted (a retry arrived); its ledger row stays %s",
                     self.site, round_no, e.attempt_id[:8], e.state)
        return restored

    def run_finished(self, rounds_completed: int) -> bool:
        """The run ended after `rounds_completed` rounds: attempts of later rounds did not complete.
        True when the model was restored (see withhold)."""
        if self.record is None:
            return False
        restored = self._settle_unreleased("the run ended before the masked input was sent")
        self.record.ledger.mark_aborted(run_id=self.run_id, after_round=rounds_completed,
                                        note=f"attempt aborted: the run ended after {rounds_completed} round(s)")
        return restored

    def _settle_unreleased(self, why: str) -> bool:
        u = self.unreleased
        if u is None:
            return False
        if u.sent is not None and not u.sent():
            return self.withhold(u.entry.attempt_id, why)
        self.unreleased = None   # released, or it may have been: the row stays spent
        return False

    # -- the update -------------------------------------------------------------------------------
    def protect_update(self, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """User-level DP (central / distributed): the whole update is clipped to update_clip_norm;
        the distributed mechanism also adds this site's share of the noise (security/dp/user_level.py)."""
        p = self.config.privacy
        if not (p.enabled and p.mechanism in ("central", "distributed")):
            return update
        update, _norm = clip_update(update, p.update_clip_norm)
        if p.mechanism == "distributed":
            update = add_gaussian_noise(update, distributed_share_std(p.user_noise_multiplier, p.update_clip_norm,
                                                                      p.min_survivors))
        return update


def public_params(model: nn.Module, x, y) -> list[nn.Parameter]:
    """Parameters the data loss never touches (only data-independent terms, e.g. WAFFLe's
    Kumaraswamy stick parameters, which appear in the KL alone): found by one probe backward."""
    was = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    public = [q for q in model.parameters() if q.requires_grad and q.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was)
    return public
