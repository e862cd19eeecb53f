"""`ktfed task new NAME` and `ktfed task check ENTRY --data SITE_DATA`: bringing a federation's own task.

new: write a runnable task package (kt_core.task_api): the task module, a test, a sample data
file with the site-data TOML that declares it, and the run-config snippet that names the task.
check: what a site would do at join, locally and without a coordinator: import the entry, build
the model and place the adapters, load the site's data and run one batch through the loss and the
evaluation; print the parameters, the adapted layers, the bytes of one update (the shared
factors) against a dense one, and whether record-level DP-SGD can train the model.
"""
from __future__ import annotations

import argparse
import keyword
import random
import re
import sys
from pathlib import Path

from ktfed.exits import CLIError

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("task", help="bring your own model and data: scaffold or check a task package")
    sub = p.add_subparsers(dest="task_command", required=True)
    new = sub.add_parser("new", help="write a runnable task package NAME (task, test, sample data, run config)")
    new.add_argument("name", metavar="NAME", help="the package name (a Python identifier, e.g. my_task)")
    new.add_argument("--dir", default=".", help="folder to write NAME/ into (default: here)")
    new.set_defaults(func=cmd_task)
    check = sub.add_parser("check", help="load a task's model and one batch of a site's data locally and report")
    check.add_argument("entry", metavar="ENTRY", help="package.module:Class of the installed task")
    check.add_argument("--data", required=True, metavar="SITE_DATA", help="the site's data file (TOML)")
    check.add_argument("--config", metavar="RUN_CONFIG",
                       help="a run config whose [task] options and adapter to use (default: the task's defaults)")
    check.add_argument("--path", action="append", default=[], metavar="DIR",
                       help="also import from DIR (a task package not installed yet); repeatable")
    check.set_defaults(func=cmd_task)
    return p


def cmd_task(args) -> int:
    if args.task_command == "new":
        root = new_task(args.name, Path(args.dir))
        print(f"wrote {root}/ ({args.name}/task.py, tests/test_task.py, site-data.toml, data.csv, run-config.toml)")
        print(f"next: pip install -e {root}  then  ktfed task check {args.name}.task:Task --data {root}/site-data.toml")
        return 0
    return check_task(args.entry, Path(args.data), Path(args.config) if args.config else None, args.path)


# -- new ----------------------------------------------------------------------------------------

def new_task(name: str, parent: Path) -> Path:
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise CLIError(f"NAME: {name!r} is not a Python package name (lower-case letters, digits, _)")
    root = parent / name
    if root.exists():
        raise CLIError(f"{root}: already exists (choose another NAME or --dir)")
    files = {
        "pyproject.toml": PYPROJECT.format(name=name),
        f"{name}/__init__.py": f'"""{name}: a ktfed federated task."""\n',
        f"{name}/task.py": TASK_MODULE.format(name=name),
        "tests/test_task.py": TASK_TEST.format(name=name),
        "site-data.toml": SITE_DATA,
        "data.csv": sample_csv(),
        "run-config.toml": RUN_CONFIG.format(name=name),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def sample_csv(rows: int = 150, seed: int = 0) -> str:
    """Three classes of four features around different means: learnable in a few steps."""
    rng = random.Random(seed)
    centres = {"setosa": (0.0, 1.0, -1.0, 0.5), "versicolor": (1.5, -0.5, 0.5, -1.0), "virginica": (-1.0, -1.5, 1.5, 1.0)}
    lines = ["f1,f2,f3,f4,label"]
    for i in range(rows):
        label = list(centres)[i % 3]
        values = [c + rng.gauss(0.0, 0.6) for c in centres[label]]
        lines.append(",".join(f"{v:.4f}" for v in values) + f",{label}")
    return "\n".join(lines) + "\n"


# -- check --------------------------------------------------------------------------------------

def check_task(entry: str, data: Path, config_path: Path | None, paths: list[str]) -> int:
    import dataclasses

    from kt_core.config import ConfigError, RunConfig, load_file

    sys.path[:0] = [str(Path(p).resolve()) for p in paths]
    try:
        config = load_file(config_path) if config_path else RunConfig()
        config = dataclasses.replace(config, task=dataclasses.replace(config.task, kind="python", entry=entry))
        report = _inspect(config, data)
    except ConfigError as err:
        raise CLIError(str(err)) from None
    print("\n".join(report))
    return 0


def _inspect(config, data: Path) -> list[str]:
    import torch

    from kt_core.adapters import adapted_layers, dp_problems
    from kt_core.config import ConfigError
    from kt_core.manifest import manifest_of
    from kt_core.task_runner import TaskRunner, batch_of

    task = TaskRunner(config, site_data=data)
    built = task.build()
    model, manifest = built.model, manifest_of(built.model)
    site = task.site_data(built, "check", data_root=None, state_dir=Path("."))
    batch = batch_of(site.train, torch.arange(min(config.train.batch_size, site.num_samples)))
    try:
        model.train()
        loss = task.task.loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        metrics = task.evaluate(model, _first_test_batch(site, config.train.batch_size))
    except Exception as err:  # noqa: BLE001 - the task's own code failing is what this command reports
        raise ConfigError(f"task.entry: {task.entry}: one batch failed: {type(err).__name__}: {err}") from None
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shared, dense = manifest.shared_nbytes(), task.dense_update_bytes()
    layers = adapted_layers(model)
    p = config.privacy
    problems = dp_problems(model, p.grad_sample_mode)
    dp = ("yes" if not problems and task.record_level_dp else
          "no: the task overrides loss (DP-SGD clips cross-entropy on (x, y) records)" if not problems else
          "no: " + "; ".join(map(str, problems[:3])))
    if dp == "yes":
        try:
            task.dp_records(site)
        except ValueError as err:
            dp = f"no: {err}"
    a = config.task.adapter
    return [f"task          {task.cls.name} {task.version} ({task.entry}); options sha256 {task.options_sha256[:16]}…",
            f"data          {data}: {site.num_samples} training, {len(site.test)} test records",
            f"parameters    {total:,} ({trainable:,} trainable)",
            f"adapters      {a.adapter} on {len(layers)} layer(s) matching {list(task.targets())}: "
            + ", ".join(f"{n} ({k})" for n, k in layers.items()),
            f"one update    {shared:,} bytes of shared factors ({len(manifest.shared())} tensors) vs {dense:,} dense "
            f"({dense / max(shared, 1):.1f}x)",
            f"one batch     loss {float(loss):.4f}; " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())),
            f"DP-SGD        {dp}",
            f"labels        {_labels_line(task)}"]


def _first_test_batch(site, n: int):
    """The site's data with its test set cut to one batch (evaluate reads .test)."""
    import dataclasses

    from torch.utils.data import Subset

    return dataclasses.replace(site, test=Subset(site.test, range(min(len(site.test), n))))


def _labels_line(task) -> str:
    from kt_core.site_data import labels_sha256

    names = list(task.label_names)
    shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
    return f'{len(names)} ({shown}); labels_sha256 = "{labels_sha256(names)}"'


# -- templates ----------------------------------------------------------------------------------

PYPROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "A ktfed federated task"
requires-python = ">=3.11"

[tool.setuptools]
packages = ["{name}"]
"""

TASK_MODULE = '''"""{name}: a federated classifier over a site's table (ktfed's task API, kt_core.task_api).

The coordinator and every site import this module from what their operators installed, at the
version the run names; it is never sent over the wire. Change build_model and load_data to your
model and data; keep build_model a function of the options (and torch's seed) alone.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from kt_core.task_api import FederatedTask, LocalData


@dataclass(frozen=True)
class Options:
    """`[task.options]` of the run config."""
    features: int = 4       # columns the sites' data declare (site-data.toml: features)
    classes: int = 3        # label names the sites' data use
    hidden: int = 32

    def validate(self) -> None:
        for field in ("features", "classes", "hidden"):
            if getattr(self, field) < 1:
                raise ValueError(f"{{field}}: must be >= 1")


class Task(FederatedTask):
    name = "{name}"
    version = "0.1.0"
    Options = Options
    targets = ("fc1", "fc2")    # the layers that carry adapters ([task.adapter] targets overrides)

    def build_model(self) -> nn.Module:
        o = self.options
        return nn.Sequential(OrderedDict(fc1=nn.Linear(o.features, o.hidden), act=nn.ReLU(),
                                         fc2=nn.Linear(o.hidden, o.classes)))

    def load_data(self, data) -> LocalData:
        if data.features is None or data.features.shape[1] != self.options.features:
            raise ValueError(f"{{data.path}}: expected {{self.options.features}} feature columns")
        if len(data.label_names) != self.options.classes:
            raise ValueError(f"{{data.path}}: expected {{self.options.classes}} labels, found {{list(data.label_names)}}")
        train, test = data.tensor_datasets()      # (features, label index) records, split by the site's file
        return LocalData(train=train, test=test, labels=tuple(data.label_names))
'''

TASK_TEST = '''"""The task on its sample data, as a site runs it (no coordinator needed)."""
import dataclasses
from pathlib import Path

from kt_core.config import RunConfig
from kt_core.task_runner import TaskRunner

HERE = Path(__file__).resolve().parent.parent


def test_the_task_trains_on_its_sample_data():
    config = RunConfig()
    config = dataclasses.replace(config, task=dataclasses.replace(config.task, kind="python", entry="{name}.task:Task"))
    task = TaskRunner(config, site_data=HERE / "site-data.toml")
    built = task.build()
    data = task.site_data(built, "site-a", data_root=None, state_dir=HERE)
    before = task.evaluate(built.model, data)
    cfg = dataclasses.replace(config.train, epochs=10, batch_size=16, lr=0.05)
    task.train(built.model, data, cfg)
    after = task.evaluate(built.model, data)
    assert after["loss"] < before["loss"]
'''

SITE_DATA = """# This site's own data: it never leaves the site (ktfed participant run --site-data site-data.toml)
[data]
format = "csv"
path = "data.csv"              # relative to this file
features = ["f1", "f2", "f3", "f4"]
label = "label"
test_fraction = 0.2
split_seed = 0
"""

RUN_CONFIG = """# Add to the federation's run config: which task, at which version, with which options and adapters.
[task]
kind = "python"
entry = "{name}.task:Task"
version = "0.1.0"                # every site must have this version installed
# labels_sha256 = "..."          # optional: `ktfed task check` prints the digest of the label names

[task.options]
features = 4
classes = 3
hidden = 32

[task.adapter]
adapter = "lora"                 # waffle | lora | ffa_lora | dense
lora_rank = 4
"""
