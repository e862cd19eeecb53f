"""The product's side of every task: one runner around a FederatedTask (kt_core.task_api).

The services never see a task class. They hold a `TaskRunner` (kt_core.tasks.task_for), which
makes the run's task from its config, builds and adapts the model under the run's seed, loads this
site's data, trains with the product's own loop (kt_core.train.train_steps: WAFFLe's KL term,
FedProx, gradient clipping; the site's privacy engine wraps it), evaluates, and hands DP-SGD its
records. The built-in tasks are FederatedTasks like a federation's own:

    [task] kind = "image"    kt_core.image_task:ImageTask   the MLP of [model] on a public image set
    [task] kind = "vln"      kt_core.nav_task:NavTask       adapters on the hosted VLN backbone
    [task] kind = "python"   the class `[task] entry` names, installed by the operators

Whatever the kind, the site checks the version the run announces against the installed class
before it builds anything; a python task is pinned further by digests (kt_core.python_task).
"""
from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset, default_collate

from kt_core import adapters
from kt_core.config_file import ConfigError, RunUnworkable
from kt_core.python_task import TaskMismatch, frozen_sha256, load_entry, options_sha256
from kt_core.task_api import FederatedTask, LocalData, SiteContext
from kt_core.tasks import SiteData, TaskModel
from kt_core.train import TrainConfig, TrainResult, device_of, train_steps, with_kl

log = logging.getLogger(__name__)

# kind -> "module:Class": a built-in task's code (and its heavy imports) loads only when a run names it
# the names the round itself reports (participant.round); a task's round_metrics may not take them,
# and the coordinator takes at most 32 metrics an update (coordinator.admission.MAX_METRICS)
ROUND_OWN_METRICS = ("accuracy", "accuracy_before", "loss", "train_seconds", "compute_seconds")
MAX_ROUND_METRICS = 8
BUILTIN = {"image": "kt_core.image_task:ImageTask", "vln": "kt_core.nav_task:NavTask"}
EVAL_BATCH = 256


def task_class(config) -> tuple[str, type[FederatedTask]]:
    """(entry, class) of the task the run config names."""
    kind = config.task.kind
    if kind == "python":
        return config.task.entry, load_entry(config.task.entry)
    if kind not in BUILTIN:
        raise ConfigError(f"task.kind: {kind!r} is not one of {sorted([*BUILTIN, 'python'])}")
    module, name = BUILTIN[kind].split(":")
    return BUILTIN[kind], getattr(importlib.import_module(module), name)


def batch_of(dataset: Any, indices: Tensor) -> Any:
    """The rows `indices` of a training or test set, batched (the forms kt_core.task_api names)."""
    if hasattr(dataset, "batch"):
        return dataset.batch(indices)
    if isinstance(dataset, TensorDataset):   # one gather per tensor, not one item per row
        return [t[indices] for t in dataset.tensors]
    return default_collate([dataset[int(i)] for i in indices])


def _in_eval(model: nn.Module, measure):
    """measure() with the model in eval mode and no autograd, the mode put back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return measure()
    finally:
        model.train(was_training)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _length(dataset: Any) -> int | None:
    try:
        usable = hasattr(dataset, "__getitem__") or hasattr(dataset, "batch")
        return len(dataset) if usable else None
    except TypeError:
        return None


class TaskRunner:
    """One run's task at one machine: the coordinator (the model and its manifest) or a site."""

    def __init__(self, config, site_data: Path | None = None):
        self.config, self.kind = config, config.task.kind
        self.site_data_path = site_data   # at a site: its own data file (`--site-data`), for tasks that read one
        self.label_names: tuple[str, ...] = ()
        self.entry, self.cls = task_class(config)
        settings = config.task
        if settings.version and settings.version != self.cls.version:
            raise TaskMismatch(f"task.version: the run announces {self.entry} version {settings.version!r}, but "
                               f"version {self.cls.version!r} is installed here; install {settings.version!r} "
                               "(or start the run with the installed one)")
        self.options = self.cls.options_from(config)
        # a built-in task's options are the run config's own sections, which travel (and are digested) whole
        self.options_sha256 = options_sha256(self.options) if self.kind == "python" else ""
        if settings.options_sha256 and settings.options_sha256 != self.options_sha256:
            raise TaskMismatch(f"task.options_sha256: the run's options of {self.entry} digest to "
                               f"{settings.options_sha256[:16]}…, here to {self.options_sha256[:16]}… (the installed "
                               "Options have other fields or defaults)")
        self.task = self.cls(self.options)
        # DP-SGD clips per-record gradients of cross-entropy on (x, y): only for the default loss
        self.record_level_dp = self.cls.loss_is_default()
        self.hosts_backbone = self.cls.hosts_backbone

    @property
    def version(self) -> str:
        return self.cls.version

    def identity(self) -> dict[str, str]:
        """What names this task in the run's records: entry, name, version, options digest."""
        return {"entry": self.entry, "name": self.cls.name, "version": self.cls.version,
                "options_sha256": self.options_sha256}

    def check(self) -> None:
        """Refuse (ConfigError) options the task cannot run, before anything is built."""
        try:
            self.task.check()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"task.options.{err}" if self.kind == "python" else str(err)) from None

    def backbone_sha256(self) -> str:
        return self.task.backbone_sha256() if self.hosts_backbone else ""

    def dense_update_bytes(self) -> int:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.federation.seed)
            return int(self.task.dense_update_bytes())

    # -- the model ----------------------------------------------------------------------------
    def targets(self) -> tuple[str, ...]:
        return tuple(self.config.task.adapter.targets) or tuple(self.cls.targets)

    def bare_model(self, backbone: Path | None = None) -> nn.Module:
        """The task's model before adapters, built under the run's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.federation.seed)
            model = self.task.build_model(backbone) if self.hosts_backbone else self.task.build_model()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task.entry: {self.entry}.build_model returned {type(model).__name__}, "
                              "not a torch.nn.Module")
        return model.cpu()

    def build(self, backbone: Path | None = None) -> TaskModel:
        """The adapted model; `backbone`: the hosted checkpoint, for a task that adapts one."""
        model = self.bare_model(backbone)
        try:
            self.task.adapt(model, self.config.task.adapter, self.targets())
        except adapters.AdapterError as err:
            raise ConfigError(f"task.adapter.targets: {self.entry}: {err}") from None
        p = self.config.privacy
        if p.enabled and p.mechanism == "dp_sgd":
            problems = adapters.dp_problems(model, p.grad_sample_mode)
            if problems:
                raise ConfigError(f"privacy.mechanism: record-level DP-SGD cannot train {self.entry}'s adapted model: "
                                  + "; ".join(map(str, problems[:4])))
        pinned_model = self.config.task.model_sha256
        if pinned_model and (here := frozen_sha256(model)) != pinned_model:
            raise TaskMismatch(f"task.model_sha256: {self.entry}'s frozen weights here digest to {here[:16]}…, the "
                               f"run's to {pinned_model[:16]}… (other pretrained weights or software versions)")
        return TaskModel(model, self.task.tokenizer)

    # -- the site's data ----------------------------------------------------------------------
    def _declared_data(self):
        """The site's own data file, loaded and checked (for a task that reads one)."""
        from kt_core import site_data as loaders

        if self.site_data_path is None:
            raise ConfigError(f"--site-data: the run's task {self.entry} trains on this site's own data: give "
                              "its data file (ktfed participant run --site-data FILE)")
        try:
            dataset = loaders.load_site_data(self.site_data_path, task_name=self.cls.name)
            dataset.check_labels(self.config.task.labels_sha256)
        except loaders.SiteDataError as err:   # the file and its data are one input to the site
            raise ConfigError(str(err)) from None
        self.label_names = dataset.label_names   # for `ktfed task check`'s report; never sent
        return dataset

    def site_data(self, built: TaskModel, site: str, *, data_root: Path | None, state_dir: Path) -> SiteData:
        sites = tuple(self.config.federation.sites)
        dataset = self._declared_data() if self.cls.reads_site_data else None
        context = SiteContext(site, sites.index(site) if site in sites else -1, sites, Path(state_dir),
                              data_root, dataset)
        where = str(self.site_data_path)
        try:
            local = self.task.local_data(context)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as err:
            if not self.cls.reads_site_data:
                raise
            raise ConfigError(f"{where}: {self.entry}.load_data refused these data: {type(err).__name__}: {err}") from None
        if not isinstance(local, LocalData):
            raise ConfigError(f"task.entry: {self.entry}.load_data returned {type(local).__name__}, not LocalData")
        for part in ("train", "test") + (("validation",) if local.validation is not None else ()):
            n = _length(getattr(local, part))
            if n is None:
                raise ConfigError(f"task.entry: {self.entry}.load_data: {part} is not a map-style Dataset with a length")
            if n == 0 and dataset is not None:
                raise ConfigError(f"{where}: no {part} records for this site")
            if n == 0:   # the task's own data laid out by the run: the run leaves this site out
                raise RunUnworkable(f"{site}: {self.entry}.load_data gives no {part} records for this site")
        log.info("%s: %s %s: %d training and %d test records%s", site, self.cls.name, self.cls.version,
                 len(local.train), len(local.test), f" from {where}" if dataset is not None else "")
        return SiteData(train=local.train, test=local.test, num_samples=len(local.train), levels=tuple(local.levels),
                        context=context, local=local, validation=local.validation)

    # -- training and evaluation ----------------------------------------------------------------
    def train(self, model: nn.Module, data: SiteData, cfg: TrainConfig,
              optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
        """One round of local training; `optimizer`: the site's kept one (None: a fresh one)."""
        dataset, n, device = data.train, data.num_samples, device_of(model)

        def batch_loss(idx: Tensor) -> Tensor:
            loss = self.task.loss(model, _to(batch_of(dataset, idx), device))
            if not (isinstance(loss, Tensor) and loss.ndim == 0):
                raise TypeError(f"{self.entry}.loss must return a scalar tensor, got {type(loss).__name__}")
            return with_kl(model, loss, n, cfg.kl_weight)

        return train_steps(model, n, batch_loss, cfg, optimizer=optimizer)

    def test_batches(self, data: SiteData, batch_size: int = EVAL_BATCH, part: str = "test"):
        dataset = getattr(data, part)
        for i in range(0, len(dataset), batch_size):
            yield batch_of(dataset, torch.arange(i, min(i + batch_size, len(dataset))))

    def evaluate(self, model: nn.Module, data: SiteData, part: str = "test") -> dict[str, float]:
        """The task's metrics on the site's `part` ("test", or "validation" where it holds one)."""
        device = device_of(model)
        batches = (_to(b, device) for b in self.test_batches(data, part=part))
        return self._checked_metrics(_in_eval(model, lambda: self.task.evaluate(model, batches)))

    def round_metrics(self, model: nn.Module, data: SiteData) -> dict[str, float]:
        """The task's `round_metrics` (the navigation task's rollouts), checked: finite numbers
        under names that are neither the round's own nor too long for the coordinator."""
        result = _in_eval(model, lambda: self.task.round_metrics(model, data.context, data.local))
        if not isinstance(result, dict) or len(result) > MAX_ROUND_METRICS:
            raise ValueError(f"{self.entry}.round_metrics must return a dict of at most {MAX_ROUND_METRICS} metrics")
        for key in result:
            if not (isinstance(key, str) and key.isidentifier() and len(key) <= 40) or key in ROUND_OWN_METRICS:
                raise ValueError(f"{self.entry}.round_metrics: {key!r} is not a usable metric name (an identifier "
                                 f"of at most 40 characters, none of {list(ROUND_OWN_METRICS)})")
        return self._finite(result, "round_metrics")

    def _checked_metrics(self, result: Any) -> dict[str, float]:
        if not isinstance(result, dict):
            raise TypeError(f"{self.entry}.evaluate must return a dict of metrics, got {type(result).__name__}")
        out = self._finite(result, "evaluate")
        missing = [m for m in (*self.cls.metrics, "accuracy", "loss") if m not in out]
        if missing:
            raise ValueError(f"{self.entry}.evaluate: metrics {sorted(set(missing))} missing (it declares "
                             f"{list(self.cls.metrics)}; the round reports accuracy and loss)")
        return out

    def _finite(self, result: dict, hook: str) -> dict[str, float]:
        out = {}
        for key, value in result.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{self.entry}.{hook}: metric {key!r} = {value!r} is not a finite number")
            out[key] = float(value)
        return out

    def dp_records(self, data: SiteData):
        """(x, y) tensors of every training record: the default loss's cross-entropy on (x, y)."""
        dataset = data.train
        try:
            # a TensorDataset's own tensors: gathering every row would hold the training set twice
            x, y = dataset.tensors if isinstance(dataset, TensorDataset) else batch_of(dataset, torch.arange(len(dataset)))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"privacy.mechanism: record-level DP-SGD needs training records (x, y) of tensors with one "
                             f"shape; {self.entry}'s are not ({err})") from None
        if not (isinstance(x, Tensor) and isinstance(y, Tensor) and y.ndim == 1 and y.dtype == torch.int64):
            raise ValueError(f"privacy.mechanism: record-level DP-SGD needs records (x tensor, integer label); "
                             f"{self.entry}'s training records are not")
        return x, y

    # -- the end of the run ---------------------------------------------------------------------
    def final_evaluation(self, built: TaskModel, data: SiteData) -> dict:
        return self.task.final_evaluation(built.model, data.context, data.local)

    def describe_final(self, result: dict) -> str:
        return self.task.describe_final(result)

    def report_final(self, evaluations: dict[str, dict]) -> list[str]:
        return self.task.report_final(evaluations)
