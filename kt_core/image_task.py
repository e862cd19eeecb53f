"""The built-in image task: a classifier with factorized adapters (kt_core.models) on this site's
share of a public image data set (kt_core.data), as a FederatedTask like any federation's own.

What it does beyond the common case of kt_core.task_api, through the API's optional hooks:
  options     the run config itself: [model] sizes the MLP and its adapters, [data] names the data
              set and the partition, [federation] the sites; all of it travels to every site
  adapt       the MLP is built with its adapters in place ([model] adapter and sizes; the factors of
              each layer seeded from [model] seed), so nothing more is placed on it
  local_data  the site's shard of the partition [data] lays out, a pure function of the labels, the
              site names and the partition seed (kt_core.data.site_split): no site sees another's
              indices, and its test set follows its own label distribution; a tenth of its training
              share is held back as its validation part (VALIDATION_FRACTION), by which it chooses
              the model it keeps at the end of the run
The loss and the evaluation are the API's defaults: cross-entropy on (x, y), so record-level
DP-SGD is offered.
"""
from __future__ import annotations

import dataclasses
import logging
import zlib

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kt_core.config_file import RunUnworkable
from kt_core.data import load_dataset, site_split
from kt_core.factorized import Adapter
from kt_core.manifest import manifest_of
from kt_core.models import build_model
from kt_core.task_api import FederatedTask, LocalData, SiteContext

log = logging.getLogger(__name__)

# The share of a site's training records it holds back to choose, at the end of the run, between
# the final aggregate and its own last local model (participant.trainer.LocalTrainer.conclude).
# Under record-level DP the aggregate was below the last local model in 6 of 7 runs of the image
# demo's config and no better than a site alone; without DP it was the better of the two
# (bench/README.md, "The image demo under DP"), so neither can be fixed in advance. Below
# MIN_VALIDATION records the choice would be a coin toss: the site keeps the aggregate then.
VALIDATION_FRACTION = 0.1
MIN_VALIDATION = 20


def held_back(n: int, site: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training indices, validation indices or None) of a site's n training records: a fixed
    draw from the site's name and the partition seed, so a site that resumes holds back the same."""
    n_val = int(n * VALIDATION_FRACTION)
    if n_val < MIN_VALIDATION:
        return np.arange(n), None
    order = np.random.default_rng([zlib.crc32(site.encode()), int(seed)]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class ImageTask(FederatedTask):
    name = "image"
    version = "1"
    reads_site_data = False   # the coordinator's [data] lays the public set out over the sites

    @classmethod
    def options_from(cls, config):
        return config

    def build_model(self) -> nn.Module:
        return build_model(self.options.model)

    def adapt(self, model: nn.Module, settings, targets) -> list[str]:
        return [name for name, m in model.named_modules() if isinstance(m, Adapter)]

    def local_data(self, site: SiteContext) -> LocalData:
        config = self.options
        data = load_dataset(config.data.dataset, root=site.data_root, max_train=config.data.max_train or None,
                            max_test=config.data.max_test or None)
        part = config.data.partition
        try:
            train_x, train_y, test_x, test_y = site_split(data, site.sites, site.name, part)
        except ValueError as err:   # the partition's own rule (e.g. more classes a site than the data has)
            raise RunUnworkable(f"data.partition.{err}") from None
        for what, labels, total in (("training", train_y, len(data.train_y)), ("test", test_y, len(data.test_y))):
            if len(labels) == 0:
                # the run's partition leaves this site out: it declines the run, naming the setting
                raise RunUnworkable(f"{site.name}: data.partition (scheme {part.scheme!r}, seed {part.seed}) gives "
                                    f"this site no {what} samples of {total} over {len(site.sites)} sites")
        keep, val = held_back(len(train_y), site.name, config.data.partition.seed)
        log.info("%s: %d training, %d validation and %d test samples (%s, %s)", site.name, len(keep),
                 0 if val is None else len(val), len(test_y), config.data.dataset, config.data.partition.scheme)

        def tensors(x, y) -> TensorDataset:
            return TensorDataset(torch.from_numpy(x).float(), torch.from_numpy(y).long())

        return LocalData(train=tensors(train_x[keep], train_y[keep]), test=tensors(test_x, test_y),
                         validation=None if val is None else tensors(train_x[val], train_y[val]))

    def dense_update_bytes(self) -> int:
        """The MLP with dense layers of the same sizes: what full FedAvg would send."""
        return manifest_of(build_model(dataclasses.replace(self.options.model, adapter="dense"))).shared_nbytes()
