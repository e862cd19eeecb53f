"""The examples of examples/: each task on its own site data files, and each run as a real
federation through the CLI (a coordinator and 2-3 participant processes on 127.0.0.1, mTLS) with
secure aggregation, record-level DP-SGD and the audit log on; the auditor's report names the task
and its version. A site whose data break their declared schema stops with an error naming the file
and the column, and sends nothing."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from kt_core import adapters
from kt_core.config import load_toml
from kt_core.site_data import labels_sha256, load_site_data

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# the participant and coordinator processes import the example tasks as installed packages would be
ENV = {"PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def example(name: str, module: str):
    return importlib.import_module(f"{name}.{module}")


def run_config(name: str) -> dict:
    return tomllib.loads((EXAMPLES / name / "run.toml").read_text())


def task_of(name: str):
    entry = run_config(name)["task"]["entry"]
    module, _, cls = entry.partition(":")
    task_cls = getattr(importlib.import_module(module), cls)
    options = task_cls.Options(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in run_config(name)["task"].get("options", {}).items()})
    return task_cls(options)


CASES = {"tabular_csv": {}, "image_folder": {"limit": 200}, "text_lora": {"per_site": 60}}


@pytest.mark.parametrize("name", list(CASES))
def test_each_example_loads_its_sites_data_and_trains_a_step_with_its_adapters(examples_path, tmp_path, name):
    files = example(name, "make_data").write_sites(tmp_path, **CASES[name])
    cfg = run_config(name)
    task = task_of(name)
    assert cfg["task"]["version"] == task.version and (EXAMPLES / name / "README.md").is_file()
    torch.manual_seed(cfg["federation"]["seed"])
    model = task.build_model()
    adapter = cfg["task"]["adapter"]
    sizes = {k: v for k, v in adapter.items() if k in adapters.SIZES}
    adapted = adapters.apply_adapters(model, adapter["adapter"], adapter["targets"], **sizes)
    if name == "image_folder":   # the CNN's convolutions carry adapters, not only its head
        assert {k.split("/")[0] for k in adapters.adapted_layers(model).values()} == {"conv2d", "linear"}
    assert adapted and set(files) <= set(cfg["federation"]["sites"])
    for site, path in files.items():
        data = load_site_data(path, task_name=task.name)
        assert data.labels_sha256 == cfg["task"]["labels_sha256"], site   # every site holds the run's label set
        local = task.load_data(data)
        x, y = next(iter(torch.utils.data.DataLoader(local.train, batch_size=8)))
        loss = task.loss(model, (x, y))
        loss.backward()
        assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad()
        metrics = task.evaluate(model.eval(), [local.test[:]])
        model.train()
        assert 0 <= metrics["accuracy"] <= 1 and len(local.test) > 0


def test_the_run_configs_name_their_tasks_and_the_label_sets_their_sites_declare():
    for name in CASES:
        cfg = load_toml((EXAMPLES / name / "run.toml").read_text(), f"{name}/run.toml")
        assert cfg.task.kind == "python" and cfg.task.entry.startswith(f"{name}.task:")
        declared = example(name, "make_data").LABELS
        assert cfg.task.labels_sha256 == labels_sha256(declared)


# ---------------------------------------------------------------------------------------------
# real federations
# ---------------------------------------------------------------------------------------------

def _ktfed(*args, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "ktfed", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENV})


def federate(federation, name: str, files: dict[str, Path], overrides: dict[str, str], timeout: float = 600,
             expect_exit: dict[str, int] | None = None, policy: str | None = None):
    """Run example `name` through the CLI: its run.toml at the coordinator (with `overrides` as
    KTFED_RUN__ variables), each site on its own data file; returns the final status."""
    config = federation.workdir / "run.toml"
    config.write_text((EXAMPLES / name / "run.toml").read_text())
    env = {**ENV, **{f"KTFED_RUN__{k}": v for k, v in overrides.items()}}
    for site in files:   # each site's own policy: this task only, SecAgg and DP required
        federation.policy_file(site).parent.mkdir(parents=True, exist_ok=True)
        federation.policy_file(site).write_text(policy or (EXAMPLES / name / "site-policy.toml").read_text())
    federation.start_coordinator(config, env=env)
    federation.wait_for(lambda: federation.coordinator.poll() is not None or federation.client.serving(), 120,
                        "the coordinator to serve")
    assert federation.coordinator.poll() is None, federation.tail_logs()
    for site, path in files.items():
        federation.start_participant(site, env=ENV, args=["--site-data", str(path)])
    status = federation.wait_for(lambda: (s := federation.status()).state != "running" and s, timeout,
                                 f"the {name} run to finish")
    for site, proc in federation.participants.items():
        assert proc.wait(60) == (expect_exit or {}).get(site, 0), federation.tail_logs()
    assert status.state == "finished", federation.tail_logs()
    return status


def audited(federation, tmp_path, sites, name: str) -> dict:
    """The auditor's view: every log verifies; the report names the example's task and version."""
    task = task_of(name)
    dirs = [federation.workdir / "coordinator" / "audit"] + [federation.workdir / "sites" / s / "audit" for s in sites]
    done = _ktfed("audit", "verify", *dirs, "--pki", federation.pki)
    assert done.returncode == 0, done.stdout + done.stderr
    done = _ktfed("audit", "report", *dirs, "--pki", federation.pki, "--out", tmp_path / "report")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    html = (tmp_path / "report" / "index.html").read_text()
    entry = run_config(name)["task"]["entry"]
    # the task as each producer's logged run config names it: its entry point at its pinned version,
    # and the label set the sites agreed on
    configs = {c["producer"]: c["task"] for c in report["manifest"]["configs"]}
    assert set(configs) == {"coordinator", *sites}, configs
    for task_named in configs.values():
        assert (task_named["entry"], task_named["version"]) == (entry, task.version), configs
        assert task_named["labels_sha256"] == run_config(name)["task"]["labels_sha256"]
    assert entry in html and task.version in html
    return report


def _check_private_and_secure(status, sites, record_level: bool = True):
    for record in status.rounds:
        assert set(record.contributors) == set(sites) and record.secagg, record
    info = {s.site_id: s for s in status.sites}
    for site in sites:
        if record_level:   # DP-SGD spent within the run's target, accounted by the site itself
            assert 0 < info[site].epsilon_spent <= 8.0 + 1e-6, info[site]


def test_tabular_csv_federates_and_a_site_whose_table_breaks_its_schema_sends_nothing(federation, tmp_path,
                                                                                     examples_path):
    files = example("tabular_csv", "make_data").write_sites(tmp_path / "data", 3)
    # site-c's export has a text in a numeric column: refused by line and column, before it trains
    csv_c = tmp_path / "data" / "site-c.csv"
    lines = csv_c.read_text().splitlines()
    cells = lines[5].split(",")
    cells[3] = "n/a"
    lines[5] = ",".join(cells)
    csv_c.write_text("\n".join(lines) + "\n")
    status = federate(federation, "tabular_csv", files,
                      {"FEDERATION__ROUNDS": "2", "FEDERATION__MIN_SITES": "2", "TRAIN__EPOCHS": "1"},
                      expect_exit={"site-c": 2})
    _check_private_and_secure(status, ["site-a", "site-b"])
    message = f"{csv_c}: mean_perimeter: line 6: 'n/a' is not a number"
    assert message in federation.log("site-c") + (federation.workdir / "logs" / "site-c.out").read_text()
    # site-c's own audit log: the refusal, named; nothing sent across its boundary
    entries = [json.loads(line) for line in
               (federation.workdir / "sites" / "site-c" / "audit" / "audit.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "refusal" and e["body"]["detail"] == message for e in entries), entries
    assert not any(e["kind"] == "boundary" for e in entries)
    with federation.db() as db:   # and nothing of site-c reached the coordinator
        assert db.execute("SELECT COUNT(*) FROM uploads WHERE site_id = 'site-c'").fetchone() == (0,)
    # the auditor is given the logs of the sites that took part (site-c left before the seal)
    audited(federation, tmp_path, ["site-a", "site-b"], "tabular_csv")


@pytest.mark.slow
def test_image_folder_federates_with_adapters_on_its_convolutions(federation, tmp_path, examples_path):
    files = example("image_folder", "make_data").write_sites(tmp_path / "data", 2, limit=300)
    status = federate(federation, "image_folder", files, {"FEDERATION__ROUNDS": "2", "TRAIN__EPOCHS": "1"})
    # record-level DP-SGD through the adapted convolutions, accounted by each site
    _check_private_and_secure(status, ["site-a", "site-b"])
    audited(federation, tmp_path, ["site-a", "site-b"], "image_folder")


@pytest.mark.slow
def test_text_lora_federates_minilm_on_texts_split_by_a_column(federation, tmp_path, examples_path):
    files = example("text_lora", "make_data").write_sites(tmp_path / "data", per_site=100)
    status = federate(federation, "text_lora", files, {"FEDERATION__ROUNDS": "2"}, timeout=900)
    _check_private_and_secure(status, ["site-a", "site-b"])
    audited(federation, tmp_path, ["site-a", "site-b"], "text_lora")
