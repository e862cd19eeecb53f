"""The task API: how a federation brings its own model and a site its own data.

A task is an installed Python package exposing a `FederatedTask` subclass; a run config names it
by entry point and pins its version:

    [task]
    kind = "python"
    entry = "my_task.task:MyTask"     # package.module:Class, installed at the coordinator and every site
    version = "1.0"                   # the site refuses the run unless its installed task says the same
    [task.options]                    # the task's own Options, validated field by field
    hidden = 64
    [task.adapter]                    # where adapters go on the task's model (kt_core.adapters)
    adapter = "lora"
    targets = ["fc1", "fc2"]

The coordinator never ships code: both sides import what their operators installed. The model
must be the same everywhere (the frozen base never travels), so `build_model` must be a function
of the options and of torch's seed, which the caller sets from the run's seed. A site's data are
declared in the site's own file (`ktfed participant run --site-data FILE`, kt_core.site_data),
loaded and schema-checked before `load_data` sees them.

The product trains the model with its own loop (WAFFLe's KL term, DP-SGD, the update's privacy
and egress checks all apply); a task says only what a batch's loss and an evaluation are.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

if TYPE_CHECKING:  # the loader's module imports heavier readers (parquet, images) only when used
    from kt_core.site_data import SiteDataset

__all__ = ["FederatedTask", "LocalData", "NoOptions", "default_loss", "default_evaluate"]


@dataclass(frozen=True)
class NoOptions:
    """The options of a task that has none: `[task.options]` must then be empty."""


@dataclass
class LocalData:
    """What a task makes of one site's data: never leaves the site.

    `train` and `test` are map-style Datasets whose items the default loss and evaluation take as
    (x, y) with y an int64 class index; `labels` are the label names this site's data use, in the
    order of those indices (the run can pin their digest, kt_core.site_data.labels_sha256)."""
    train: Dataset
    test: Dataset
    labels: tuple[str, ...] = ()


class FederatedTask(ABC):
    """A federation's own learning problem. Subclass it, set `name` and `version`, and implement
    `build_model` and `load_data`; override `loss` and `evaluate` when a batch is not (x, y) with
    cross-entropy on class indices.

    Class attributes:
      name      the task's name, as the audit report and `ktfed task check` show it
      version   the installed version; a site refuses a run announcing another one
      Options   a frozen dataclass of the task's own options (`[task.options]`), with defaults; an
                optional `validate()` raising ValueError("field: problem") is called after the types
                are checked, as for every ktfed settings section
      metrics   the names `evaluate` returns (the round reports "accuracy" and "loss")
      targets   module-name patterns of the layers that carry adapters by default
                (`[task.adapter] targets` overrides them)
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "loss")
    targets: ClassVar[tuple[str, ...]] = ("*",)

    def __init__(self, options: Any):
        self.options = options

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, before adapters: deterministic given torch.manual_seed (set by the caller),
        so the coordinator and every site build the same one. Pretrained weights are loaded from
        files this machine's operator installed, never fetched."""

    @abstractmethod
    def load_data(self, data: "SiteDataset") -> LocalData:
        """This site's training and test sets from its declared, schema-checked data."""

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The mean loss of one training batch (as collated by torch's default_collate, on the
        model's device). Default: cross-entropy of model(x) against y for batches (x, y)."""
        return default_loss(model, batch)

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Metrics over the test batches, the model in eval mode and gradients off. Default:
        accuracy and mean cross-entropy over batches (x, y)."""
        return default_evaluate(model, batches)

    @classmethod
    def loss_is_default(cls) -> bool:
        """Record-level DP-SGD clips per-record gradients of cross-entropy on (x, y) records, so it
        is offered only to a task that keeps the default loss."""
        return cls.loss is FederatedTask.loss


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = _pair(batch)
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def default_evaluate(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    correct, loss_sum, n = 0, 0.0, 0
    for batch in batches:
        x, y = _pair(batch)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += int(y.shape[0])
    if n == 0:
        raise ValueError("evaluate: the test set is empty")
    return {"accuracy": correct / n, "loss": loss_sum / n}


def _pair(batch: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"the default loss and evaluation take batches (x, y), got {type(batch).__name__}; "
                        "override FederatedTask.loss / evaluate for other batches")
    x, y = batch
    return x, y


def options_fields(options_cls: type) -> list[str]:
    """The field names of a task's Options (for messages and the scaffolding)."""
    return [f.name for f in dataclasses.fields(options_cls)]
