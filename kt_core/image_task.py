"""The image task: a classifier with factorized adapters (kt_core.models) trained on this site's
share of a local image data set (kt_core.data), by the plain ELBO loop of kt_core.train."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from kt_core.data import load_dataset, site_split
from kt_core.models import build_model
from kt_core.tasks import SiteData, Task, TaskModel
from kt_core.train import TrainConfig, TrainResult, evaluate, train_local

log = logging.getLogger(__name__)


class ImageTask(Task):
    kind = "image"

    def build(self, backbone: Path | None = None) -> TaskModel:
        return TaskModel(build_model(self.config.model))

    def site_data(self, built: TaskModel, site: str, *, data_root: Path | None, state_dir: Path) -> SiteData:
        config = self.config
        data = load_dataset(config.data.dataset, root=data_root, max_train=config.data.max_train or None,
                            max_test=config.data.max_test or None)
        train_x, train_y, test_x, test_y = site_split(data, config.federation.sites, site, config.data.partition)
        if len(train_y) == 0:
            raise ValueError(f"site {site} received no training samples from the partition")
        log.info("%s: %d training and %d test samples (%s, %s)", site, len(train_y), len(test_y),
                 config.data.dataset, config.data.partition.scheme)
        return SiteData(train=(torch.from_numpy(train_x), torch.from_numpy(train_y)),
                        test=(torch.from_numpy(test_x), torch.from_numpy(test_y)), num_samples=len(train_y))

    def train(self, model: nn.Module, data: SiteData, cfg: TrainConfig) -> TrainResult:
        return train_local(model, *data.train, cfg)

    def evaluate(self, model: nn.Module, data: SiteData) -> dict[str, float]:
        return evaluate(model, *data.test)

    def dp_records(self, data: SiteData):
        return data.train

    def dense_update_bytes(self) -> int:
        from kt_core.manifest import manifest_of

        dense = dataclasses.replace(self.config.model, adapter="dense")
        return manifest_of(build_model(dense)).shared_nbytes()
