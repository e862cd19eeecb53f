"""The site's model and data: load the global shared factors, train locally, produce the update.

The private factors (WAFFLe's factor selection) live here and on the site's disk, never on the wire.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kt_core.config import RunConfig
from kt_core.data import load_dataset, site_split
from kt_core.manifest import manifest_of
from kt_core.models import build_model, load_private_state, load_shared_state, private_state, shared_state
from kt_core.train import TrainResult, evaluate, train_local

log = logging.getLogger(__name__)


class LocalTrainer:
    def __init__(self, site: str, run_id: str, config: RunConfig, state_dir: Path, data_root: Path | None = None):
        self.site = site
        self.config = config
        self.model = build_model(config.model)
        self.manifest = manifest_of(self.model)
        data = load_dataset(config.data.dataset, root=data_root, max_train=config.data.max_train or None,
                            max_test=config.data.max_test or None)
        train_x, train_y, test_x, test_y = site_split(data, config.federation.sites, site, config.data.partition)
        if len(train_y) == 0:
            raise ValueError(f"site {site} received no training samples from the partition")
        self.train_x, self.train_y = torch.from_numpy(train_x), torch.from_numpy(train_y)
        self.test_x, self.test_y = torch.from_numpy(test_x), torch.from_numpy(test_y)
        self.private_path = Path(state_dir) / f"private-{run_id}.safetensors"
        if self.private_path.exists():
            try:
                load_private_state(self.model, load_file(str(self.private_path)))
                log.info("%s: restored private factors from %s", site, self.private_path)
            except (SafetensorError, OSError, ValueError) as err:
                raise ValueError(f"private state {self.private_path} is unusable: {err}") from None
        log.info("%s: %d training and %d test samples (%s, %s)", site, len(train_y), len(test_y),
                 config.data.dataset, config.data.partition.scheme)

    @property
    def num_samples(self) -> int:
        return len(self.train_y)

    def load_global(self, state: dict[str, np.ndarray]) -> None:
        load_shared_state(self.model, {n: torch.from_numpy(np.array(a)) for n, a in state.items()})

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.test_x, self.test_y)

    def train(self, epochs: int, batch_size: int, lr: float, max_steps: int, seed: int) -> TrainResult:
        # The coordinator chooses these per round; everything else comes from the run config.
        cfg = dataclasses.replace(self.config.train, epochs=epochs, batch_size=batch_size, lr=lr,
                                  max_steps=max_steps or None, seed=seed)
        cfg.validate()
        return train_local(self.model, self.train_x, self.train_y, cfg)

    def update(self, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Delta of the shared tensors since `base`: what this site contributes to the round."""
        return {n: t.numpy() - base[n] for n, t in shared_state(self.model).items()}

    def private_tensors(self) -> dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in private_state(self.model).items()}

    def save_private(self) -> None:
        tmp = self.private_path.with_suffix(".tmp")
        self.private_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in private_state(self.model).items()}, str(tmp))
        os.replace(tmp, self.private_path)
