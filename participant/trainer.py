"""The site's model and data: load the global shared factors, train locally, produce the update.

The run's task (kt_core.tasks) says what the model and the data are and how to train and evaluate
them; this site's privacy engine (participant.privacy) says how a round may be trained and what
the update may reveal. The private factors (WAFFLe's factor selection) live here and on the
site's disk, never on the wire.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kt_core import tasks
from kt_core.config import RunConfig
# transitional: ktfed/simulate.py swaps this name for a reader shared by its virtual sites; the
from kt_core.manifest import Role, manifest_of
from kt_core.models import load_private_state, load_shared_state, private_state, shared_state
from kt_core.site_optimizer import SiteOptimizer
from kt_core.train import TrainConfig, TrainResult
from participant.audit_trail import NoAudit
from participant.privacy import BudgetExceeded, SitePrivacy
from security.dp.engine import DPUnsupportedError

log = logging.getLogger(__name__)

__all__ = ["LocalTrainer", "BudgetExceeded", "DPUnsupportedError"]


class TrainingDiverged(RuntimeError):
    """A round's local training diverged: its model was dropped, nothing is sent for it."""


class LocalTrainer:
    def __init__(self, site: str, run_id: str, config: RunConfig, state_dir: Path, data_root: Path | None = None,
                 epsilon_budget: float | None = None, *, backbone: Path | None = None, audit=None,
                 site_data: Path | None = None):
        self.site, self.run_id, self.config = site, run_id, config
        self.task = tasks.task_for(config, site_data)   # site_data: the site's own data file, if any
        SitePrivacy.check_offered(config, self.task)
        self.built = self.task.build(backbone)
        self.model = self.built.model
        self.manifest = manifest_of(self.model)
        self.data = self.task.site_data(self.built, site, data_root=data_root, state_dir=Path(state_dir))
        # the private tensors as the run's seed built them: what a diverged round goes back to
        self.initial_private = {n: t.detach().clone() for n, t in private_state(self.model).items()}
        self.private_path = Path(state_dir) / f"private-{run_id}.safetensors"
        if self.private_path.exists():
            try:
                load_private_state(self.model, load_file(str(self.private_path)))
                log.info("%s: restored private factors from %s", site, self.private_path)
            except (SafetensorError, OSError, ValueError) as err:
                raise ValueError(f"private state {self.private_path} is unusable: {err}") from None
        # momentum / Adam moments, kept from round to round and on disk beside the private factors
        self.optimizer = SiteOptimizer(self.model)
        self.optimizer_path = Path(state_dir) / f"optimizer-{run_id}.safetensors"
        if self.optimizer.load(self.optimizer_path, config.train):
            log.info("%s: restored optimizer state from %s", site, self.optimizer_path)
        self.privacy = SitePrivacy(site, run_id, config, self.task, state_dir=Path(state_dir),
                                   num_samples=self.num_samples, model=self.model, local_budget=epsilon_budget,
                                   audit=audit if audit is not None else NoAudit())

    @property
    def ledger(self):
        """The site's privacy ledger (None without DP-SGD): for reading, e.g. by the operator."""
        return self.privacy.ledger

    def round_config(self, epochs: int, batch_size: int, lr: float, max_steps: int, seed: int) -> TrainConfig:
        """The run's training settings with what the coordinator chose for this round, bounded as
        the run's own are (ValueError naming the field: a coordinator may send anything here)."""
        cfg = dataclasses.replace(self.config.train, epochs=epochs, batch_size=batch_size, lr=lr,
                                  max_steps=max_steps or None, seed=seed)
        cfg.validate()
        return cfg

    def train(self, epochs: int, batch_size: int, lr: float, max_steps: int, seed: int, *,
              round_no: int = 0, attempt_id: str = "") -> TrainResult:
        """Raises BudgetExceeded, before any training, when the round would pass the site's budget."""
        # The coordinator chooses these per round; everything else comes from the run config.
        cfg = self.round_config(epochs, batch_size, lr, max_steps, seed)
        before = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        try:
            return self.privacy.train(self.task, self.model, self.data, cfg, round_no=round_no,
                                      attempt_id=attempt_id, optimizer=self.optimizer.for_round(cfg))
        except FloatingPointError as err:
            # the loss went to inf or NaN: the round's model is dropped, so nothing of it is sent.
            # The private tensors go back to where the run started them, not to before the round:
            # on a site of a few records under DP the noise had walked them (its private bias,
            # its selection) so far that the round's very first step diverged, round after round;
            # the shared ones come from the next global state, and the optimizer starts afresh
            self.model.load_state_dict(before)
            load_private_state(self.model, self.initial_private)
            self.optimizer.reset()
            self.optimizer_path.unlink(missing_ok=True)   # a restart must not load the moments back
            self.save_private()
            raise TrainingDiverged(f"round {round_no}: {err}; the private factors are back to the run's "
                                   "start") from None

    def privacy_metrics(self) -> dict[str, float]:
        return self.privacy.metrics()

    # -- state -------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.data.num_samples

    def shared_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, shape) of every tensor the manifest declares shared."""
        return {e.name: (e.dtype, tuple(e.shape)) for e in self.manifest.entries if e.role == Role.SHARED}

    def load_global(self, state: dict[str, np.ndarray]) -> None:
        load_shared_state(self.model, {n: torch.from_numpy(np.array(a)) for n, a in state.items()})

    def evaluate(self, part: str = "test") -> dict[str, float]:
        return self.task.evaluate(self.model, self.data, part)

    def round_metrics(self) -> dict[str, float]:
        """The task's costly per-round metrics (the navigation task's rollouts; {} for most)."""
        return self.task.round_metrics(self.model, self.data)

    def update(self, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Delta of the shared tensors since `base`, as this site's privacy allows it to leave:
        what this site contributes to the round."""
        update = {n: t.numpy() - base[n] for n, t in shared_state(self.model).items()}
        return self.privacy.protect_update(update)

    def private_tensors(self) -> dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in private_state(self.model).items()}

    # -- the end of the run -------------------------------------------------------------------------
    def conclude(self, state_dir: Path, final: tuple[str, dict[str, np.ndarray]] | None, *, round_no: int,
                 reason: str) -> Path | None:
        """At RunFinished: keep the private factors; with the run's final global state (digest,
        tensors) load it and write the site's adapted model, STATE/adapted-<run>.safetensors
        (kt_core.tasks.save_adapted: what a site distills its student from); then the task's final
        evaluation of that model and its metrics on the site's test split (`test_<metric>`) to
        STATE/evaluation-<run>.json. Returns the adapted model's
        path (None without the final state: no file then, since the last local model is not the
        federation's)."""
        # the run's end closes its last attempt: the privacy engine settles what that one cost
        # (and puts the private factors back when that attempt's update never left)
        self.privacy.run_finished(round_no)
        self.save_private()
        path, kept, choice = None, tasks.KEPT_LAST_LOCAL + " (the final global state was not available)", None
        if final is not None:
            digest, state = final
            last_local = {n: t.detach().clone() for n, t in shared_state(self.model).items()}
            self.load_global(state)
            kept, choice = self._choose_kept(state, last_local)
            path = tasks.adapted_path(state_dir, self.run_id)
            tasks.save_adapted(path, self.model, self.config, site=self.site, levels=self.data.levels,
                               run_id=self.run_id, round_no=round_no, global_state_digest=digest, reason=reason,
                               kept=kept)
            log.info("%s: adapted model (%s; final global state %s… after round %d) written to %s",
                     self.site, kept, digest[:16], round_no, path)
        # the model the site keeps is scored, on its own test split too: the rounds' accuracies are
        # of each round's local training, before that round's aggregation
        result = {**self.task.final_evaluation(self.built, self.data),
                  **{f"test_{k}": v for k, v in self.evaluate().items()}}
        if result:
            self._write_evaluation(state_dir, {**result, **({"choice": choice} if choice else {})}, final, kept)
        return path

    def _choose_kept(self, state: dict[str, np.ndarray], last_local: dict[str, torch.Tensor]) -> tuple[str, dict | None]:
        """With the final global state loaded: keep it, or go back to this site's last local model
        where that scores higher on the site's validation part (a task that holds none keeps the
        aggregate; a tie keeps it too). The kept model never leaves the site, so the choice
        releases nothing to the coordinator."""
        if self.data.validation is None:
            return tasks.KEPT_FINAL_AGGREGATE, None
        aggregate = self.evaluate("validation").get("accuracy")
        load_shared_state(self.model, last_local)
        local = self.evaluate("validation").get("accuracy")
        keep_local = aggregate is not None and local is not None and local > aggregate
        if not keep_local:
            self.load_global(state)
        kept = tasks.KEPT_LAST_LOCAL if keep_local else tasks.KEPT_FINAL_AGGREGATE
        log.info("%s: validation accuracy: final aggregate %s, last local model %s: keeps the %s", self.site,
                 aggregate, local, kept)
        return kept, {"validation_accuracy": {"final_aggregate": aggregate, "last_local_model": local},
                      "validation_records": len(self.data.validation), "kept": kept}

    def _write_evaluation(self, state_dir: Path, result: dict, final, kept: str) -> None:
        result["model"] = kept
        result["global_state_digest"] = final[0] if final is not None else None
        out = Path(state_dir) / f"evaluation-{self.run_id}.json"
        out.write_text(json.dumps(result, indent=2, sort_keys=True))
        log.info("%s: final evaluation: %s (%s)", self.site, self.task.describe_final(result), out)

    def save_private(self) -> None:
        tmp = self.private_path.with_suffix(".tmp")
        self.private_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in private_state(self.model).items()}, str(tmp))
        os.replace(tmp, self.private_path)
        self.optimizer.save(self.optimizer_path)
