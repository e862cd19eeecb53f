"""The task API (kt_core.task_api, kt_core.python_task): entry points, options, version pins, a
federation's own model trained on a site's own data, and the scaffolding (`ktfed task`)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from kt_core import tasks
from kt_core.config import ConfigError, RunConfig, load_toml
from kt_core.manifest import Role, manifest_of
from kt_core.models import shared_state
from kt_core.python_task import TaskMismatch, frozen_sha256, load_entry, options_sha256, pinned
from kt_core.task_runner import TaskRunner
from kt_core.task_api import FederatedTask, LocalData

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TinyOptions:
    features: int = 4
    classes: int = 3
    hidden: int = 8
    scale: float = 1.0

    def validate(self) -> None:
        if self.hidden < 1:
            raise ValueError("hidden: must be >= 1")


class TinyTask(FederatedTask):
    name = "tiny"
    version = "1.0"
    Options = TinyOptions
    targets = ("fc1", "fc2")

    def build_model(self) -> nn.Module:
        o = self.options
        return nn.Sequential(OrderedDict(fc1=nn.Linear(o.features, o.hidden), act=nn.ReLU(),
                                         fc2=nn.Linear(o.hidden, o.classes)))

    def load_data(self, data) -> LocalData:
        train, test = data.tensor_datasets()
        return LocalData(train, test, data.label_names)


class CustomLoss(TinyTask):
    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)


class TinyConv(TinyTask):
    targets = ("conv",)

    def build_model(self) -> nn.Module:
        # a grouped convolution: the one adapted layer DP-SGD has no per-sample gradient rule for
        return nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 2, 1, groups=2), flat=nn.Flatten(), fc=nn.Linear(8, 3)))


class NoVersion(TinyTask):
    version = ""


class NotATask:
    pass


def write_csv(folder: Path, rows: int = 90, *, labels=("a", "b", "c"), extra: str = "") -> Path:
    gen = torch.Generator().manual_seed(0)
    lines = ["f1,f2,f3,f4,label"]
    for i in range(rows):
        k = i % len(labels)
        x = torch.randn(4, generator=gen) * 0.5 + torch.tensor([k, -k, k / 2, 1.0 - k])
        lines.append(",".join(f"{v:.4f}" for v in x.tolist()) + f",{labels[k]}")
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    toml = folder / "site-data.toml"
    toml.write_text(f'[data]\nformat = "csv"\npath = "data.csv"\nlabel = "label"\ntest_fraction = 0.25\n{extra}')
    return toml


def config(entry: str = "tests.test_task_api:TinyTask", task_extra: str = "", rest: str = "") -> RunConfig:
    return load_toml(f"""
[federation]
seed = 5
[train]
batch_size = 16
lr = 0.1
[task]
kind = "python"
entry = "{entry}"
{task_extra}
{rest}
""", "run.toml")


# -- entry points, options, pins -------------------------------------------------------------------

def test_entry_errors_name_the_field_and_what_is_wrong():
    cases = {"no_such_pkg.tasks:Task": "module 'no_such_pkg' is not installed",
             "tests.test_task_api:Missing": "has no 'Missing'",
             "tests.test_task_api:NotATask": "is not a kt_core.task_api.FederatedTask subclass",
             "tests.test_task_api:NoVersion": "sets no version",
             "kt_core.task_api:FederatedTask": "does not implement",
             "tests/test_task_api.py": "not of the form package.module:Class"}
    for entry, why in cases.items():
        with pytest.raises(ConfigError) as err:
            load_entry(entry)
        assert str(err.value).startswith("task.entry: ") and why in str(err.value), entry
    assert load_entry("tests.test_task_api:TinyTask") is TinyTask


def test_options_are_validated_by_field():
    for table, message in (('bogus = 1', "task.options.bogus: unknown field"),
                           ('hidden = "wide"', "task.options.hidden: expected an integer"),
                           ('hidden = 0', "task.options.hidden: must be >= 1")):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            TaskRunner(config(rest=f"[task.options]\n{table}"))
    task = TaskRunner(config(rest="[task.options]\nhidden = 4\nscale = 2"))
    assert task.options == TinyOptions(hidden=4, scale=2.0)


def test_options_digest_is_of_the_validated_options():
    default = TaskRunner(config()).options_sha256
    # the defaults spelled out are the same options; an int for a float field is the same number
    assert TaskRunner(config(rest="[task.options]\nhidden = 8\nscale = 1")).options_sha256 == default
    assert TaskRunner(config(rest="[task.options]\nhidden = 9")).options_sha256 != default
    assert options_sha256(TinyOptions()) == default


def test_config_round_trip_and_kind_checks():
    c = config(task_extra='version = "1.0"', rest='[task.options]\nhidden = 4\n[task.adapter]\nadapter = "ffa-lora"\n'
                                                  'targets = ["fc2"]\nlora_rank = 2')
    again = RunConfig.from_json(c.to_json())
    assert again == c and again.task.adapter.adapter == "ffa_lora" and again.task.options == {"hidden": 4}
    with pytest.raises(ConfigError, match=r"task\.entry: only for kind \"python\""):
        load_toml('[task]\nkind = "image"\nentry = "a.b:C"', "run.toml")
    with pytest.raises(ConfigError, match=r"task\.entry: required"):
        load_toml('[task]\nkind = "python"', "run.toml")
    with pytest.raises(ConfigError, match=r"task\.adapter\.adapter: 'qlora'"):
        config(rest='[task.adapter]\nadapter = "qlora"')
    with pytest.raises(ConfigError, match=r"task\.labels_sha256: must be a SHA-256"):
        config(task_extra='labels_sha256 = "abc"')


def test_the_coordinator_pins_version_options_and_frozen_model():
    c = config()
    resolved = c.resolved()
    assert resolved.task.version == "1.0"
    assert resolved.task.options_sha256 == TaskRunner(c).options_sha256
    assert resolved.task.model_sha256 == frozen_sha256(TaskRunner(c).build().model)
    assert resolved.resolved() == resolved        # resolving again checks, changes nothing
    assert tasks.task_for(resolved).identity() == {"entry": "tests.test_task_api:TinyTask", "name": "tiny",
                                                   "version": "1.0", "options_sha256": resolved.task.options_sha256}


def test_a_site_with_another_version_or_options_refuses():
    resolved = config().resolved()
    other = dataclasses.replace(resolved, task=dataclasses.replace(resolved.task, version="0.9"))
    with pytest.raises(TaskMismatch) as err:
        tasks.task_for(other)
    message = str(err.value)
    assert message.startswith("task.version: ") and "tests.test_task_api:TinyTask" in message
    assert "'0.9'" in message and "'1.0'" in message
    wrong = dataclasses.replace(resolved, task=dataclasses.replace(resolved.task, options_sha256="0" * 64))
    with pytest.raises(TaskMismatch, match=r"task\.options_sha256"):
        TaskRunner(wrong)
    frozen = dataclasses.replace(resolved, task=dataclasses.replace(resolved.task, model_sha256="0" * 64))
    with pytest.raises(TaskMismatch, match=r"task\.model_sha256"):
        TaskRunner(frozen).build()


# -- the model -----------------------------------------------------------------------------------

def test_the_model_is_the_same_everywhere_and_adapted_as_declared():
    c = config(rest='[task.adapter]\nadapter = "waffle"\nn_factors = 4')
    a, b = TaskRunner(c).build().model, TaskRunner(c).build().model
    assert manifest_of(a).digest() == manifest_of(b).digest() and frozen_sha256(a) == frozen_sha256(b)
    for name, t in shared_state(a).items():
        torch.testing.assert_close(t, shared_state(b)[name])
    roles = {e.name: e.role for e in manifest_of(a).entries}
    assert roles["fc1.w_a"] is Role.SHARED and roles["fc1.gate_logits"] is Role.PRIVATE and roles["fc1.w0"] is Role.FROZEN
    # another run seed is another model
    reseeded = dataclasses.replace(c, federation=dataclasses.replace(c.federation, seed=6))
    assert frozen_sha256(TaskRunner(reseeded).build().model) != frozen_sha256(a)


def test_a_target_pattern_that_matches_nothing_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        TaskRunner(config(rest='[task.adapter]\ntargets = ["decoder.*"]')).build()
    assert str(err.value).startswith("task.adapter.targets: ") and "'decoder.*'" in str(err.value)
    assert "fc1" in str(err.value)


def test_a_site_policy_on_adapter_targets_sees_the_task_classs_own_targets():
    from participant.policy import check_join, loads

    policy = loads("[model]\ntasks = ['python']\nadapter_targets = ['fc1']", "policy.toml")
    # the run names no targets: TinyTask's own ("fc1", "fc2") are what it adapts
    assert [v.rule for v in check_join(policy, config(), site="s", shared={})] == ["model.adapter_targets"]
    narrowed = config(rest='[task.adapter]\ntargets = ["fc1"]')
    assert [v.rule for v in check_join(policy, narrowed, site="s", shared={})] == []


def test_dp_compatibility_is_checked_when_the_model_is_built():
    dp = "[privacy]\nenabled = true\nnoise_multiplier = 1.0\nepsilon_budget = 5.0"
    with pytest.raises(ConfigError, match=r"privacy\.mechanism: record-level DP-SGD cannot train .*conv"):
        TaskRunner(config("tests.test_task_api:TinyConv", rest=dp)).build()
    TaskRunner(config(rest=dp)).build()
    assert TaskRunner(config()).record_level_dp and not TaskRunner(config("tests.test_task_api:CustomLoss")).record_level_dp


# -- a site's data, training, evaluation -----------------------------------------------------------

def _site(tmp_path, c=None, **kw):
    task = TaskRunner(c or config(), site_data=write_csv(tmp_path, **kw))
    built = task.build()
    return task, built, task.site_data(built, "site-a", data_root=None, state_dir=tmp_path)


def test_a_site_trains_the_task_with_the_products_loop(tmp_path):
    task, built, data = _site(tmp_path, config(rest='[task.adapter]\nadapter = "lora"\nlora_rank = 2'))
    assert data.num_samples == len(data.train) > len(data.test) > 0
    before = task.evaluate(built.model, data)
    frozen = frozen_sha256(built.model)
    cfg = dataclasses.replace(task.config.train, epochs=15)
    result = task.train(built.model, data, cfg)
    after = task.evaluate(built.model, data)
    assert result.steps > 0 and after["loss"] < before["loss"] and after["accuracy"] >= 0.6
    assert frozen_sha256(built.model) == frozen   # only the adapters moved
    x, y = task.dp_records(data)
    assert x.shape == (data.num_samples, 4) and y.dtype == torch.int64


def test_waffle_trains_with_its_kl_term(tmp_path):
    task, built, data = _site(tmp_path, config(rest='[task.adapter]\nadapter = "waffle"\nn_factors = 4'))
    cfg = dataclasses.replace(task.config.train, epochs=2)
    with_kl = task.train(built.model, data, cfg).loss
    task2, built2, data2 = _site(tmp_path, config(rest='[task.adapter]\nadapter = "waffle"\nn_factors = 4'))
    without = task2.train(built2.model, data2, dataclasses.replace(cfg, kl_weight=0.0)).loss
    assert with_kl > without   # the same draws: the KL term is what differs


def test_site_data_must_be_given_and_match_the_run_labels(tmp_path):
    task = TaskRunner(config())
    with pytest.raises(ConfigError, match="--site-data"):
        task.site_data(task.build(), "site-a", data_root=None, state_dir=tmp_path)
    from kt_core.site_data import labels_sha256

    pinned_labels = f'labels_sha256 = "{labels_sha256(["a", "b", "c"])}"'
    _site(tmp_path, config(task_extra=pinned_labels))
    with pytest.raises(ConfigError, match=r"site-data\.toml: labels: this site's label set \['a', 'b', 'x'\]"):
        _site(tmp_path, config(task_extra=pinned_labels), labels=("a", "b", "x"))


def test_a_task_whose_data_do_not_fit_is_refused_naming_the_file(tmp_path):
    class Wide(TinyTask):
        def load_data(self, data):
            raise ValueError("expected 10 feature columns")

    task = TaskRunner(config())
    task.task = Wide(task.options)
    task.site_data_path = write_csv(tmp_path)
    with pytest.raises(ConfigError, match=r"site-data\.toml: .*load_data refused these data: .*10 feature columns"):
        task.site_data(task.build(), "site-a", data_root=None, state_dir=tmp_path)


def test_custom_metrics_are_checked(tmp_path):
    task, built, data = _site(tmp_path)
    task.task.evaluate = lambda model, batches: {"accuracy": 1.0}
    with pytest.raises(ValueError, match=r"metrics \['loss'\] missing"):
        task.evaluate(built.model, data)
    task.task.evaluate = lambda model, batches: {"accuracy": 1.0, "loss": float("nan")}
    with pytest.raises(ValueError, match="not a finite number"):
        task.evaluate(built.model, data)


# -- scaffolding -----------------------------------------------------------------------------------

def _ktfed(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ktfed", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_task_new_writes_a_package_that_checks_and_passes_its_test(tmp_path):
    made = _ktfed("task", "new", "clinic_task", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    root = tmp_path / "clinic_task"
    assert {p.name for p in root.iterdir()} >= {"clinic_task", "tests", "site-data.toml", "data.csv", "run-config.toml"}
    checked = _ktfed("task", "check", "clinic_task.task:Task", "--data", str(root / "site-data.toml"),
                     "--path", str(root))
    assert checked.returncode == 0, checked.stderr
    out = checked.stdout
    assert "clinic_task 0.1.0" in out and "fc1 (linear/FactorizedLinear)" in out and "DP-SGD        yes" in out
    assert "bytes of shared factors" in out and "labels_sha256" in out
    # the snippet it wrote is a valid [task] section naming the package
    snippet = (root / "run-config.toml").read_text()
    c = load_toml(snippet, "run-config.toml")
    assert c.task.entry == "clinic_task.task:Task" and c.task.adapter.adapter == "lora"
    env = {**__import__("os").environ, "PYTHONPATH": f"{root}:{ROOT}"}
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                          capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert test.returncode == 0, test.stdout + test.stderr
    again = _ktfed("task", "new", "clinic_task", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = _ktfed("task", "new", "Clinic-Task", "--dir", str(tmp_path))
    assert bad.returncode == 2 and "NAME" in bad.stderr


def test_task_check_names_a_missing_entry_and_a_bad_pattern(tmp_path):
    data = write_csv(tmp_path)
    missing = _ktfed("task", "check", "nowhere.task:Task", "--data", str(data))
    assert missing.returncode == 2 and "task.entry" in missing.stderr and "nowhere" in missing.stderr
    cfg = tmp_path / "run.toml"
    cfg.write_text('[task]\nkind = "python"\nentry = "x.y:Z"\n[task.adapter]\ntargets = ["encoder.*"]\n')
    bad = _ktfed("task", "check", "tests.test_task_api:TinyTask", "--data", str(data), "--config", str(cfg))
    assert bad.returncode == 2 and "'encoder.*'" in bad.stderr and "fc1" in bad.stderr


# -- real federations: a coordinator and sites as processes, mTLS on 127.0.0.1 -----------------------

FED_TASK = '''
from dataclasses import dataclass
from torch import nn
from kt_core.task_api import FederatedTask, LocalData


@dataclass(frozen=True)
class Options:
    hidden: int = 8


class Task(FederatedTask):
    name = "fedtiny"
    version = "{version}"
    Options = Options
    targets = ("0", "2")

    def build_model(self):
        return nn.Sequential(nn.Linear(4, self.options.hidden), nn.ReLU(), nn.Linear(self.options.hidden, 3))

    def load_data(self, data):
        train, test = data.tensor_datasets()
        return LocalData(train, test, data.label_names)
'''


def _install(folder: Path, version: str) -> dict:
    """The task package as one machine's operator installed it: its own folder on PYTHONPATH."""
    (folder / "fedtiny").mkdir(parents=True)
    (folder / "fedtiny" / "__init__.py").write_text(FED_TASK.format(version=version))
    return {"PYTHONPATH": f"{folder}:{ROOT}"}


def _python_run(sites, rounds: int = 2, extra: str = "") -> str:
    names = ", ".join(f'"{s}"' for s in sites)
    return f"""
[federation]
rounds = {rounds}
min_sites = {len(sites)}
round_timeout_s = 60
sites = [{names}]
seed = 3
[train]
epochs = 3
batch_size = 16
lr = 0.1
[task]
kind = "python"
entry = "fedtiny:Task"
version = "1.0"
[task.options]
hidden = 16
[task.adapter]
adapter = "lora"
lora_rank = 2
{extra}
"""


def _site_files(federation, site: str, version: str, tmp: Path) -> tuple[dict, list[str]]:
    federation.policy_file(site).parent.mkdir(parents=True, exist_ok=True)
    federation.policy_file(site).write_text('[model]\ntasks = ["fedtiny:Task"]\nadapters = ["lora"]\n')
    data = tmp / f"data-{site}"
    data.mkdir()
    return _install(tmp / f"installed-{site}", version), ["--site-data", str(write_csv(data))]


def test_a_python_task_federates_with_dp_and_the_audit_names_it(federation, tmp_path):
    from ktfed.audit_report import collect
    from security.audit.verify import verify

    dp = "[privacy]\nenabled = true\nnoise_multiplier = 0.8\nepsilon_budget = 100.0\ndelta = 0.001"
    config = federation.write_config(_python_run(["site-a", "site-b"], extra=dp))
    federation.start_coordinator(config, env=_install(tmp_path / "installed-coordinator", "1.0"))
    federation.wait_serving()
    for site in ("site-a", "site-b"):
        env, args = _site_files(federation, site, "1.0", tmp_path)
        federation.start_participant(site, env=env, args=args)
    status = federation.wait_for(lambda: (s := federation.status()).state == "finished" and s, 240, "the run")
    assert [r.round for r in status.rounds] == [1, 2]
    assert "site-a/accuracy" in status.rounds[-1].metrics and "site-b/epsilon" in status.rounds[-1].metrics
    for proc in federation.participants.values():
        assert proc.wait(60) == 0
    dirs = [federation.workdir / "coordinator" / "audit"] + [federation.workdir / "sites" / s / "audit"
                                                             for s in ("site-a", "site-b")]
    result = verify(dirs, federation.pki / "ca.crt")
    assert result.ok, result.summary()
    # the auditor's report names the task, the version every site ran and the options' digest
    tasks_seen = {(c["producer"], c["task"]["entry"], c["task"]["version"], len(c["task"]["options_sha256"]))
                  for c in collect(result)["manifest"]["configs"]}
    assert tasks_seen == {(p, "fedtiny:Task", "1.0", 64) for p in ("coordinator", "site-a", "site-b")}


def test_a_site_with_another_version_refuses_before_anything_is_sent(federation, tmp_path):
    config = federation.write_config(_python_run(["site-a"]))
    federation.start_coordinator(config, env=_install(tmp_path / "installed-coordinator", "1.0"))
    federation.wait_serving()
    env, args = _site_files(federation, "site-a", "2.0", tmp_path)
    proc = federation.start_participant("site-a", env=env, args=args)
    assert proc.wait(120) == 2
    log = federation.log("site-a")
    assert "task.version" in log and "fedtiny:Task" in log and "'1.0'" in log and "'2.0'" in log, log[-2000:]
    db = federation.db()
    assert db.execute("SELECT COUNT(*) FROM uploads").fetchone() == (0,)
    assert db.execute("SELECT COUNT(*) FROM declines").fetchone() == (0,)
    assert federation.status().rounds_completed == 0


def test_a_bad_site_data_file_stops_the_site_before_it_connects(tmp_path):
    bad = tmp_path / "site-data.toml"
    bad.write_text('[data]\nformat = "xlsx"\npath = "data.xlsx"\n')
    run = _ktfed("participant", "run", "--site", "site-a", "--insecure", "--coordinator", "127.0.0.1:9",
                 "--state", str(tmp_path / "state"), "--site-data", str(bad))
    assert run.returncode == 2 and str(bad) in run.stderr and "data.format: 'xlsx'" in run.stderr


class WithRoundMetrics(TinyTask):
    """A task whose round also reports a costly metric (as the navigation task's rollouts)."""
    reply: dict = {"margin": 0.25}

    def round_metrics(self, model, site, data):
        assert not model.training and site.name == "site-a" and len(data.train) > 0
        return dict(type(self).reply)


def test_a_tasks_round_metrics_are_checked_before_they_are_reported(tmp_path):
    task, built, data = _site(tmp_path, config("tests.test_task_api:WithRoundMetrics"))
    assert task.round_metrics(built.model, data) == {"margin": 0.25}
    assert built.model.training   # put back as it was
    (tmp_path / "plain").mkdir()
    plain, plain_built, plain_data = _site(tmp_path / "plain", config())
    assert plain.round_metrics(plain_built.model, plain_data) == {}   # the default: none
    for reply, message in (({"accuracy": 1.0}, "not a usable metric name"), ({"a b": 1.0}, "not a usable"),
                           ({"x" * 41: 1.0}, "not a usable"), ({"m": float("nan")}, "not a finite number"),
                           ({"m": True}, "not a finite number"), ({f"m{i}": 0.0 for i in range(9)}, "at most 8")):
        WithRoundMetrics.reply = reply
        with pytest.raises(ValueError, match=message):
            task.round_metrics(built.model, data)
    WithRoundMetrics.reply = {"margin": 0.25}
