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
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

if TYPE_CHECKING:  # the loader's module imports heavier readers (parquet, images) only when used
    from kt_core.adapters import AdapterSettings
    from kt_core.site_data import SiteDataset

__all__ = ["FederatedTask", "LocalData", "NoOptions", "SiteContext", "default_loss", "default_evaluate"]


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
    levels: tuple[str, ...] = ()   # named parts of the task this site holds (navigation levels), kept
                                   # with its adapted model
    # records held back from `train`, by which the site judges at the end of the run whether to keep
    # the final aggregate or its own last local model (participant.trainer.LocalTrainer.conclude);
    # None: it keeps the final aggregate
    validation: Dataset | None = None


@dataclass(frozen=True)
class SiteContext:
    """Who and where a task's `local_data` runs: never sent anywhere.

    `dataset` is the site's own declared data (`--site-data FILE`, loaded and schema-checked) for
    a task that reads one, else None; `data_root` is where the built-in image task finds its
    public data set, `state_dir` the site's state folder (for caches the task derives)."""
    name: str
    index: int
    sites: tuple[str, ...]
    state_dir: Path
    data_root: Path | None = None
    dataset: "SiteDataset | None" = None


class FederatedTask(ABC):
    """A federation's own learning problem. Subclass it, set `name` and `version`, and implement
    `build_model` and `load_data`; override `loss` and `evaluate` when a batch is not (x, y) with
    cross-entropy on class indices. The built-in image and navigation tasks (kt_core.image_task,
    kt_core.nav_task) are subclasses too, using the optional hooks below the line.

    Class attributes:
      name      the task's name, as the audit report and `ktfed task check` show it
      version   the installed version; a site refuses a run announcing another one
      Options   a frozen dataclass of the task's own options (`[task.options]`), with defaults; an
                optional `validate()` raising ValueError("field: problem") is called after the types
                are checked, as for every ktfed settings section
      metrics   the names `evaluate` returns (the round reports "accuracy" and "loss")
      targets   module-name patterns of the layers that carry adapters by default
                (`[task.adapter] targets` overrides them)

    A training or test set is a map-style Dataset whose items torch's default_collate batches, or
    any object with `__len__` and `batch(indices) -> batch` (rows gathered at once, e.g. tensors
    indexed by a LongTensor); a TensorDataset is batched by indexing its tensors.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "loss")
    targets: ClassVar[tuple[str, ...]] = ("*",)
    # the optional hooks' switches (the built-in tasks set them)
    reads_site_data: ClassVar[bool] = True    # the site declares its data in its own file (--site-data)
    hosts_backbone: ClassVar[bool] = False    # build_model(backbone) gets the coordinator's hosted checkpoint

    def __init__(self, options: Any):
        self.options = options
        self.tokenizer: Any = None   # what build_model loads beside the model (the VLN mission tokenizer)

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, before adapters: deterministic given torch.manual_seed (set by the caller),
        so the coordinator and every site build the same one. Pretrained weights are loaded from
        files this machine's operator installed, never fetched. (With `hosts_backbone`, the hosted
        checkpoint's path is passed: `build_model(backbone)`.)"""

    def load_data(self, data: "SiteDataset") -> LocalData:
        """This site's training and test sets from its declared, schema-checked data."""
        raise NotImplementedError(f"{type(self).__name__} implements neither load_data nor local_data")

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

    # -- optional hooks: what the built-in tasks need beyond the common case ---------------------
    @classmethod
    def options_from(cls, config: Any) -> Any:
        """The options this task is made with, from the run config (kt_core.config.RunConfig).
        Default: `[task.options]` built into `Options`, every field checked. A built-in task takes
        the run config's own sections ([model], [data], [vln]), which travel whole."""
        from kt_core.python_task import build_options

        return build_options(cls, config.task.options)

    def check(self) -> None:
        """Refuse (ValueError "field: problem") options this task cannot run, before any model is
        built or data read (e.g. navigation levels that do not exist)."""

    def adapt(self, model: nn.Module, settings: "AdapterSettings", targets: tuple[str, ...]) -> list[str]:
        """Place the run's adapters on the model, in place; returns the adapted layers' names.
        Default: `[task.adapter]`'s kind and sizes on the layers `targets` select
        (kt_core.adapters.apply_adapters; AdapterError for a pattern that selects nothing)."""
        from kt_core import adapters

        return adapters.apply_adapters(model, settings.adapter, targets, **settings.sizes())

    def local_data(self, site: SiteContext) -> LocalData:
        """This site's data. Default: `load_data` of the site's declared data file."""
        if site.dataset is None:
            raise ValueError("--site-data: this task trains on the site's own data: give its data file")
        return self.load_data(site.dataset)

    def backbone_sha256(self) -> str:
        """With `hosts_backbone`: the SHA-256 of the checkpoint the run names."""
        return ""

    def dense_update_bytes(self) -> int:
        """What one update would cost if every weight were sent: the dense FedAvg baseline the
        factor manifest's bytes are compared with. Default: every parameter of `build_model()`'s
        model (a task with `hosts_backbone` overrides it, reading the checkpoint's sizes)."""
        model = self.build_model()
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def round_metrics(self, model: nn.Module, site: SiteContext, data: LocalData) -> dict[str, float]:
        """Metrics beyond `evaluate`'s that the round reports after the site's training (the
        navigation task: the success rate of rollouts); {} by default. The site's policy still
        decides which of them leave ([metrics] report)."""
        return {}

    def final_evaluation(self, model: nn.Module, site: SiteContext, data: LocalData) -> dict:
        """The evaluation at the end of the run of the site's adapted model, written to
        STATE/evaluation-<run>.json ({}: none beyond the rounds' metrics)."""
        return {}

    def describe_final(self, result: dict) -> str:
        """One line of a site's log about its final evaluation."""
        import json

        return json.dumps(result, sort_keys=True)[:300]

    def report_final(self, evaluations: dict[str, dict]) -> list[str]:
        """Lines the demo's summary prints of each site's final evaluation."""
        return []


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
