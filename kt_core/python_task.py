"""The "python" task kind: a federation's own FederatedTask (kt_core.task_api), named by entry point.

`load_entry` imports the class a run config names, from what this machine's operator installed
(the coordinator never ships code); kt_core.task_runner runs it as it runs the built-in tasks.
What a site runs is pinned on three values the run config carries, filled in by the coordinator
when the run starts (`pinned`) and checked by every site before it builds anything:

    task.version          the task's `version`: a site with another one installed refuses the run
    task.options_sha256   SHA-256 of the canonical JSON of the validated options (defaults included)
    task.model_sha256     SHA-256 of the adapted model's frozen tensors: the pretrained weights and
                          seeded adapter parts that never travel, so every site must hold the same

"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import re
from typing import Any

import torch
from torch import nn

from kt_core.config_file import ConfigError, build as build_section
from kt_core.task_api import FederatedTask

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


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
    missing = sorted(getattr(cls, "__abstractmethods__", None) or ())
    if cls.reads_site_data and cls.load_data is FederatedTask.load_data and cls.local_data is FederatedTask.local_data:
        missing.append("load_data")
    if missing:
        raise ConfigError(f"task.entry: {entry!r} does not implement {missing}")
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


def pinned(config):
    """The run config with the python task's pins filled in (the coordinator, as a run starts):
    the installed version when the operator named none, the options digest and the frozen-model
    digest. A pin the operator gave is checked, not replaced."""
    from kt_core.task_runner import TaskRunner

    task = TaskRunner(config)
    model = task.build().model
    settings = dataclasses.replace(config.task, version=config.task.version or task.version,
                                   options_sha256=task.options_sha256, model_sha256=frozen_sha256(model))
    return dataclasses.replace(config, task=settings)
