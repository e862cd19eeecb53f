"""The "python" task kind: a federation's own FederatedTask (kt_core.task_api), run by the product.

`PythonTask` is kt_core.tasks' internal `Task` around the class a run config names by entry point.
It imports only what this machine's operator installed (the coordinator never ships code), and
pins what it runs on three digests the run config carries, filled in by the coordinator when the
run starts (`pinned`) and checked by every site before it builds anything:

    task.version          the task's `version`: a site with another one installed refuses the run
    task.options_sha256   SHA-256 of the canonical JSON of the validated options (defaults included)
    task.model_sha256     SHA-256 of the adapted model's frozen tensors: the pretrained weights and
                          seeded adapter parts that never travel, so every site must hold the same

The product's own loop trains the model (kt_core.train.train_steps: WAFFLe's KL term, FedProx,
gradient clipping), and the site's privacy engine wraps it as for the built-in tasks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from kt_core import adapters
from kt_core.config_file import ConfigError, build as build_section
from kt_core.tasks import SiteData, Task, TaskModel
from kt_core.task_api import FederatedTask, LocalData
from kt_core.train import TrainConfig, TrainResult, device_of, train_steps, with_kl

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
EVAL_BATCH = 256


class TaskMismatch(ConfigError):
    """The run names a task this machine does not have as announced (version, options, model)."""


def load_entry(entry: str) -> type[FederatedTask]:
    """The FederatedTask subclass `package.module:Class` names, imported from what is installed."""
    if not isinstance(entry, str) or not _ENTRY.match(entry):
        raise ConfigError(f"task.entry: {entry!r} is not of the form package.module:Class")
    module_name, _, class_name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"task.entry: {entry!r}: module {err.name!r} is not installed here "
                          "(the coordinator never ships code: install the task package on this machine)") from None
    except Exception as err:  # noqa: BLE001 - the task's own import-time error, reported as the entry's
        raise ConfigError(f"task.entry: {entry!r}: importing {module_name} failed: {type(err).__name__}: {err}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"task.entry: {entry!r}: module {module_name} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, FederatedTask)):
        raise ConfigError(f"task.entry: {entry!r} is not a kt_core.task_api.FederatedTask subclass")
    if getattr(cls, "__abstractmethods__", None):
        raise ConfigError(f"task.entry: {entry!r} does not implement {sorted(cls.__abstractmethods__)}")
    for attr in ("name", "version"):
        value = getattr(cls, attr, "")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"task.entry: {entry!r} sets no {attr} (a non-empty string)")
    if not (dataclasses.is_dataclass(cls.Options) and isinstance(cls.Options, type)):
        raise ConfigError(f"task.entry: {entry!r}: Options must be a dataclass")
    return cls


def build_options(cls: type[FederatedTask], table: Any):
    """The task's Options from `[task.options]`: every key a field, every value its type, then
    the Options' own validate(); errors are ConfigErrors naming task.options.<field>."""
    return build_section(cls.Options, table if table is not None else {}, "task.options")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def options_sha256(options: Any) -> str:
    """SHA-256 of the canonical JSON of validated options (dataclass fields, defaults included)."""
    return hashlib.sha256(canonical_json(dataclasses.asdict(options)).encode()).hexdigest()


def frozen_sha256(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the model's frozen tensors."""
    from kt_core.manifest import manifest_of

    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    h = hashlib.sha256()
    for entry in manifest_of(model).frozen():
        t = tensors[entry.name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{entry.name}\0{entry.dtype}\0{','.join(map(str, entry.shape))}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _collate(dataset: Dataset, indices) -> Any:
    return default_collate([dataset[int(i)] for i in indices])


class PythonTask(Task):
    kind = "python"

    def __init__(self, config, site_data: Path | None = None):
        super().__init__(config)
        self.site_data_path = site_data
        self.label_names: tuple[str, ...] = ()
        settings = config.task
        self.entry = settings.entry
        self.cls = load_entry(settings.entry)
        if settings.version and settings.version != self.cls.version:
            raise TaskMismatch(f"task.version: the run announces {self.entry} version {settings.version!r}, but "
                               f"version {self.cls.version!r} is installed here; install {settings.version!r} "
                               "(or start the run with the installed one)")
        self.options = build_options(self.cls, settings.options)
        self.options_sha256 = options_sha256(self.options)
        if settings.options_sha256 and settings.options_sha256 != self.options_sha256:
            raise TaskMismatch(f"task.options_sha256: the run's options of {self.entry} digest to "
                               f"{settings.options_sha256[:16]}…, here to {self.options_sha256[:16]}… (the installed "
                               "Options have other fields or defaults)")
        self.task = self.cls(self.options)
        # DP-SGD clips per-record gradients of cross-entropy on (x, y): only for the default loss
        self.record_level_dp = self.cls.loss_is_default()

    @property
    def version(self) -> str:
        return self.cls.version

    def identity(self) -> dict[str, str]:
        """What names this task in the run's records: entry, name, version, options digest."""
        return {"entry": self.entry, "name": self.cls.name, "version": self.cls.version,
                "options_sha256": self.options_sha256}

    # -- the model ----------------------------------------------------------------------------
    def targets(self) -> tuple[str, ...]:
        return tuple(self.config.task.adapter.targets) or tuple(self.cls.targets)

    def bare_model(self) -> nn.Module:
        """The task's model before adapters, built under the run's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.federation.seed)
            model = self.task.build_model()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task.entry: {self.entry}.build_model returned {type(model).__name__}, "
                              "not a torch.nn.Module")
        return model.cpu()

    def build(self, backbone: Path | None = None) -> TaskModel:
        model = self.bare_model()
        a = self.config.task.adapter
        try:
            adapters.apply_adapters(model, a.adapter, self.targets(), **a.sizes())
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
        return TaskModel(model)

    def check(self) -> None:
        """Entry, version and options were checked when this task was made; nothing else to do
        before the model is built."""

    def dense_update_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.bare_model().parameters())

    # -- the site's data ----------------------------------------------------------------------
    def site_data(self, built: TaskModel, site: str, *, data_root: Path | None, state_dir: Path) -> SiteData:
        from kt_core import site_data as loaders

        if self.site_data_path is None:
            raise ConfigError(f"--site-data: the run's task {self.entry} trains on this site's own data: give "
                              "its data file (ktfed participant run --site-data FILE)")
        where = str(self.site_data_path)
        try:
            dataset = loaders.load_site_data(self.site_data_path, task_name=self.cls.name)
            dataset.check_labels(self.config.task.labels_sha256)
        except loaders.SiteDataError as err:   # the file and its data are one input to the site
            raise ConfigError(str(err)) from None
        self.label_names = dataset.label_names   # for `ktfed task check`'s report; never sent
        try:
            local = self.task.load_data(dataset)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ConfigError(f"{where}: {self.entry}.load_data refused these data: {type(err).__name__}: {err}") from None
        if not isinstance(local, LocalData):
            raise ConfigError(f"task.entry: {self.entry}.load_data returned {type(local).__name__}, not LocalData")
        for part in ("train", "test"):
            n = _length(getattr(local, part))
            if n is None:
                raise ConfigError(f"task.entry: {self.entry}.load_data: {part} is not a map-style Dataset with a length")
            if n == 0:
                raise ConfigError(f"{where}: no {part} records for this site after the split")
        log.info("%s: %s %s: %d training and %d test records from %s", site, self.cls.name, self.cls.version,
                 len(local.train), len(local.test), where)
        return SiteData(train=local.train, test=local.test, num_samples=len(local.train))

    # -- training and evaluation ----------------------------------------------------------------
    def train(self, model: nn.Module, data: SiteData, cfg: TrainConfig) -> TrainResult:
        dataset, n, device = data.train, data.num_samples, device_of(model)

        def batch_loss(idx: Tensor) -> Tensor:
            loss = self.task.loss(model, _to(_collate(dataset, idx), device))
            if not (isinstance(loss, Tensor) and loss.ndim == 0):
                raise TypeError(f"{self.entry}.loss must return a scalar tensor, got {type(loss).__name__}")
            return with_kl(model, loss, n, cfg.kl_weight)

        return train_steps(model, n, batch_loss, cfg)

    def evaluate(self, model: nn.Module, data: SiteData) -> dict[str, float]:
        dataset, device = data.test, device_of(model)
        batches = (_to(_collate(dataset, range(i, min(i + EVAL_BATCH, len(dataset)))), device)
                   for i in range(0, len(dataset), EVAL_BATCH))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                result = self.task.evaluate(model, batches)
        finally:
            model.train(was_training)
        return self._checked_metrics(result)

    def _checked_metrics(self, result: Any) -> dict[str, float]:
        if not isinstance(result, dict):
            raise TypeError(f"{self.entry}.evaluate must return a dict of metrics, got {type(result).__name__}")
        out = {}
        for key, value in result.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{self.entry}.evaluate: metric {key!r} = {value!r} is not a finite number")
            out[key] = float(value)
        missing = [m for m in (*self.cls.metrics, "accuracy", "loss") if m not in out]
        if missing:
            raise ValueError(f"{self.entry}.evaluate: metrics {sorted(set(missing))} missing (it declares "
                             f"{list(self.cls.metrics)}; the round reports accuracy and loss)")
        return out

    def dp_records(self, data: SiteData):
        """(x, y) tensors of every training record: the default loss's cross-entropy on (x, y)."""
        dataset = data.train
        try:
            x, y = _collate(dataset, range(len(dataset)))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"privacy.mechanism: record-level DP-SGD needs training records (x, y) of tensors with one "
                             f"shape; {self.entry}'s are not ({err})") from None
        if not (isinstance(x, Tensor) and isinstance(y, Tensor) and y.ndim == 1 and y.dtype == torch.int64):
            raise ValueError(f"privacy.mechanism: record-level DP-SGD needs records (x tensor, integer label); "
                             f"{self.entry}'s training records are not")
        return x, y


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset) if hasattr(dataset, "__getitem__") else None
    except TypeError:
        return None


def pinned(config):
    """The run config with the python task's pins filled in (the coordinator, as a run starts):
    the installed version when the operator named none, the options digest and the frozen-model
    digest. A pin the operator gave is checked, not replaced."""
    task = PythonTask(config)
    model = task.build().model
    settings = dataclasses.replace(config.task, version=config.task.version or task.version,
                                   options_sha256=task.options_sha256, model_sha256=frozen_sha256(model))
    return dataclasses.replace(config, task=settings)
