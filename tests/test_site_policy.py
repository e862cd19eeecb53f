"""The site policy: the file's validation, each rule against a run config, and the CLI's check."""
from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kt_core.config import load_toml
from ktfed import policy_cmd
from ktfed.exits import CLIError
from participant import policy as site_policy
from kt_core.config_file import ConfigError
from participant.policy import RunHistory, SitePolicy, check_join, check_roster, check_assignment, loads
from security.egress import EgressGuard, EgressRefused
from tests.conftest import fast_config

SHARED = {"layers.0.dictionary": 4096, "head.weight": 640}


def run(extra: str = "", **kw):
    return load_toml(fast_config(**kw) + extra).resolved()


DP = """
[privacy]
enabled = true
noise_multiplier = 1.1
epsilon_budget = 4.0
max_grad_norm = 1.0
delta = 1e-5
"""
SECAGG = """
[secagg]
enabled = true
threshold = 2
"""


def rules(violations):
    return [v.rule for v in violations]


# Each field: a policy, and a run config (TOML tail, fast_config keywords) that breaks it.
BROKEN = [
    ("[model]\ntasks = ['vln']", "", {}, "model.tasks"),
    ("[model]\nadapters = ['lora']", "", {}, "model.adapters"),
    ("", "", {"adapter": "dense"}, "model.adapters"),   # the default refuses dense
    ("[egress]\ntensor_patterns = ['head.*']", "", {}, "egress.tensor_patterns"),
    ("[egress]\nmax_upload_bytes = 1000", "", {}, "egress.max_upload_bytes"),
    ("[secagg]\nrequired = true", "", {}, "secagg.required"),
    ("[secagg]\nrequired = true\nactive_required = true", SECAGG, {}, "secagg.active_required"),
    ("[secagg]\nrequired = true\nmin_threshold = 3", SECAGG, {}, "secagg.min_threshold"),
    ("[secagg]\nrequired = true\nmin_sites = 3", SECAGG, {"min_sites": 2}, "secagg.min_sites"),
    ("[privacy]\nrequired = true", "", {}, "privacy.required"),
    ("[privacy]\nlevels = ['user']", DP, {}, "privacy.levels"),
    ("[privacy]\nmax_epsilon_per_run = 1.0", DP, {}, "privacy.max_epsilon_per_run"),
    ("[privacy]\nmax_delta = 1e-6", DP, {}, "privacy.max_delta"),
    ("[privacy]\nmin_noise_multiplier = 2.0", DP, {}, "privacy.min_noise_multiplier"),
    ("[privacy]\nmax_clip_norm = 0.5", DP, {}, "privacy.max_clip_norm"),
    ("[limits]\nmax_rounds_per_run = 2", "", {"rounds": 3}, "limits.max_rounds_per_run"),
    # one round may move the global state by secagg.clip_norm (100 by default): more than 50
    ("[limits]\nmax_global_step = 50", "", {}, "limits.max_global_step"),
]


@pytest.mark.parametrize("policy_text, tail, kw, rule", BROKEN, ids=[b[3] + str(i) for i, b in enumerate(BROKEN)])
def test_each_rule_refuses_a_run_that_breaks_it_and_only_that_rule(policy_text, tail, kw, rule):
    policy = loads(policy_text, "p.toml")
    found = check_join(policy, run(tail, **kw), site="site-a", shared=SHARED)
    assert rules(found) == [rule], found
    assert all(v.detail and rule in str(v) for v in found)
    # the same run with the default policy is taken (dense aside, which the default refuses)
    assert check_join(SitePolicy(), run(tail, **kw), site="site-a", shared=SHARED) == [] or kw.get("adapter") == "dense"


def test_the_default_policy_takes_the_suites_runs():
    for tail in ("", DP, SECAGG, DP + SECAGG):
        for adapter in ("waffle", "lora", "ffa_lora"):
            assert check_join(SitePolicy(), run(tail, adapter=adapter), site="site-a", shared=SHARED) == []


def test_backbone_and_adapter_targets():
    sha = "ab" * 32
    policy = loads(f"[model]\nbackbone_sha256 = ['{'cd' * 32}']\nadapter_targets = ['q']", "p.toml")
    config = load_toml("[task]\nkind = 'vln'\n[vln.adapter]\ntargets = ['q', 'k']\n")
    assert rules(check_join(policy, config, site="s", shared={}, backbone_sha256=sha)) == \
        ["model.backbone_sha256", "model.adapter_targets"]


def test_a_backbone_announced_larger_than_the_site_downloads_is_refused_before_any_byte():
    # the coordinator announces the size; the file goes to the site's disk before its digest is known
    config = load_toml("[task]\nkind = 'vln'\n")
    assert SitePolicy().limits.max_backbone_bytes == 8 << 30
    assert check_join(SitePolicy(), config, site="s", shared={}, backbone_bytes=8 << 30) == []
    (refused,) = check_join(SitePolicy(), config, site="s", shared={}, backbone_bytes=(8 << 30) + 1)
    assert refused.rule == "limits.max_backbone_bytes" and "8589934593 bytes" in refused.detail
    small = loads("[limits]\nmax_backbone_bytes = 1000", "p.toml")
    assert rules(check_join(small, config, site="s", shared={}, backbone_bytes=1001)) == ["limits.max_backbone_bytes"]
    unlimited = loads("[limits]\nmax_backbone_bytes = 0", "p.toml")
    assert check_join(unlimited, config, site="s", shared={}, backbone_bytes=1 << 50) == []


def _sharing_bias(config):
    return dataclasses.replace(config, model=dataclasses.replace(config.model, private_output_bias=False))


def test_a_run_that_would_share_the_output_bias_is_refused_unless_the_site_allows_it():
    shares_bias = _sharing_bias(run())
    assert rules(check_join(SitePolicy(), shares_bias, site="site-a", shared=SHARED)) == ["model.private_output_bias"]
    allowing = loads("[model]\nprivate_output_bias = false", "p.toml")
    assert check_join(allowing, shares_bias, site="site-a", shared=SHARED) == []
    # the rule is about WAFFLe's private bias: a LoRA run has none (model.adapters decides on it)
    assert check_join(SitePolicy(), _sharing_bias(run(adapter="lora")), site="site-a", shared=SHARED) == []


def test_lifetime_epsilon_and_runs_per_day_count_the_sites_history(tmp_path):
    history = RunHistory(tmp_path / "runs.json")
    history.record("run-1", 3.0)
    history.record("run-1", 3.0)   # a rejoin is the same run
    policy = loads("[privacy]\nmax_epsilon_lifetime = 6.0\n[limits]\nmax_runs_per_day = 1", "p.toml")
    found = check_join(policy, run(DP), site="site-a", shared=SHARED, history=RunHistory(tmp_path / "runs.json"),
                       run_id="run-2")
    assert rules(found) == ["privacy.max_epsilon_lifetime", "limits.max_runs_per_day"]
    # rejoining run-1 itself counts neither its budget twice nor as a second run
    assert check_join(policy, run(DP), site="site-a", shared=SHARED, history=history, run_id="run-1") == []


def test_round_and_roster_checks():
    policy = loads("[secagg]\nrequired = true\nmin_sites = 3\nmax_sites = 5\nmin_threshold = 3",
                   "p.toml")
    config = run(SECAGG.replace("threshold = 2", "threshold = 0"))
    assert rules(check_assignment(policy, config, round_no=1, secure=False, roster_size=0)) == ["secagg.required"]
    assert check_assignment(policy, config, round_no=1, secure=True, roster_size=4) == []
    # a roster of 3 gives the automatic t = 2: too few holders needed to unmask
    assert rules(check_roster(policy, config, 3, "r")) == ["secagg.min_threshold"]
    assert rules(check_roster(policy, config, 2, "r")) == ["secagg.min_sites", "secagg.min_threshold"]
    assert rules(check_roster(policy, config, 6, "r")) == ["secagg.max_sites"]


BAD = [
    ("[model]\nmodes = ['waffle']", "model.modes: unknown field"),
    ("[network]\nx = 1", "network: unknown section"),
    ("[egress]\nmax_upload_bytes = 'a lot'", "egress.max_upload_bytes: expected an integer"),
    ("[secagg]\nrequired = 'yes'", "secagg.required: expected true or false"),
    ("[model]\nadapters = 'lora'", "model.adapters: expected a list of strings"),
    ("[model]\nadapters = ['dens']", "model.adapters: 'dens' is not one of"),
    ("[privacy]\nmax_delta = -1", "privacy.max_delta: must be >= 0"),
    ("[secagg]\nrequired = true\nmin_threshold = 5\nmax_sites = 4", "secagg.min_threshold: t=5 is larger"),
    ("[secagg]\nrequired = true\nmin_sites = 5\nmax_sites = 4", "secagg.min_sites: 5 is larger"),
    ("[secagg]\nmin_threshold = 3", "secagg.min_threshold: is a rule of secure aggregation"),
    ("[privacy]\nmax_epsilon_per_run = 5.0\nmax_epsilon_lifetime = 2.0", "privacy.max_epsilon_per_run: 5.0"),
    ("[coordinator]\nca_sha256 = 'abc'", "coordinator.ca_sha256: must be a SHA-256"),
    ("[egress]\ntensor_patterns = []", "egress.tensor_patterns: an empty list"),
    ("not toml [", "not valid TOML"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_policy_files_name_the_file_and_the_field(tmp_path, text, message, capsys):
    path = tmp_path / "site-policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        site_policy.load(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    with pytest.raises(CLIError) as cli_err:
        policy_cmd.check(str(path))
    assert cli_err.value.code == 2 and message in str(cli_err.value)


def test_an_unreadable_policy_file_is_a_clear_error(tmp_path):
    with pytest.raises(CLIError) as err:
        policy_cmd.check(str(tmp_path / "missing.toml"))
    assert err.value.code == 2 and "missing.toml: cannot read the site policy" in str(err.value)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="bin.toml: cannot read"):
        site_policy.load(tmp_path / "bin.toml")


def test_check_prints_every_rule_and_the_digest(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text("[secagg]\nrequired = true\nmin_threshold = 2\n")
    assert policy_cmd.check(str(path)) == 0
    out = capsys.readouterr().out
    assert loads(path.read_text(), str(path)).digest() in out and "secagg.min_threshold = 2" in out
    assert policy_cmd.check(str(path), as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["policy"]["secagg"]["required"] is True


def test_egress_guard_applies_the_sites_patterns_and_byte_limit():
    import numpy as np
    roles = {"a.shared": "shared", "b.shared": "shared", "gate": "private"}
    update = {"a.shared": np.zeros(10, np.float32), "b.shared": np.zeros(10, np.float32)}
    EgressGuard(roles, "s").check(update, "c")
    with pytest.raises(EgressRefused) as err:
        EgressGuard(roles, "s", patterns=["a.*"]).check(update, "c")
    assert err.value.rule == "egress.tensor_patterns" and "'b.shared'" in str(err.value)
    with pytest.raises(EgressRefused) as err:
        EgressGuard(roles, "s", max_bytes=79).check(update, "c")
    assert err.value.rule == "egress.max_upload_bytes" and "80 bytes" in str(err.value)
    with pytest.raises(EgressRefused) as err:  # the manifest still comes first
        EgressGuard(roles, "s").check(["gate"], "c")
    assert err.value.rule == "manifest"


def test_metrics_report_filters_what_a_round_reports():
    policy = loads("[metrics]\nreport = ['epsilon*', 'train_seconds']", "p.toml")
    assert policy.reported_metrics({"accuracy": 0.9, "loss": 1.0, "epsilon": 0.5, "train_seconds": 2.0}) == \
        {"epsilon": 0.5, "train_seconds": 2.0}


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20))
def test_a_valid_policy_never_holds_a_contradiction(t, lo, hi):
    text = f"[secagg]\nrequired = true\nmin_threshold = {t}\nmin_sites = {lo}\nmax_sites = {hi}"
    try:
        policy = loads(text, "p.toml")
    except ConfigError as err:
        assert hi and (t > hi or lo > hi), err
        return
    assert not hi or (t <= hi and lo <= hi)
    assert dataclasses.replace(policy, source="x").digest() == policy.digest()  # the digest is the rules'


def test_the_demo_policy_takes_the_demo_run_and_refuses_a_weaker_one():
    from kt_core.config import load_toml as load
    image = loads(policy_cmd.demo_policy("image", secure=True), "demo.toml")
    strong = run(DP + SECAGG)
    assert check_join(image, strong, site="site-a", shared=SHARED) == []
    assert rules(check_join(image, run(SECAGG), site="site-a", shared=SHARED)) == ["privacy.required"]
    assert rules(check_join(image, run(DP, adapter="dense"), site="site-a", shared=SHARED)) == \
        ["model.adapters", "secagg.required"]
    vln = loads(policy_cmd.demo_policy("vln", secure=False), "demo.toml")
    assert check_join(vln, load("[task]\nkind = 'vln'\n"), site="s", shared={}) == []


def test_the_policy_an_audit_log_records_rebuilds_the_same_policy():
    policy = loads("[secagg]\nrequired = true\nmin_threshold = 2\n[egress]\ntensor_patterns = ['a.*']", "p.toml")
    again = site_policy.from_table(json.loads(policy.to_json()), "audit log")
    assert again.digest() == policy.digest() and again.secagg.min_threshold == 2


def test_the_sites_own_budget_counts_towards_the_per_run_epsilon():
    policy = loads("[privacy]\nmax_epsilon_per_run = 2.0", "p.toml")
    assert rules(check_join(policy, run(DP), site="site-a", shared=SHARED)) == ["privacy.max_epsilon_per_run"]
    # --epsilon-budget 1.5: the site enforces 1.5, within its policy
    assert check_join(policy, run(DP), site="site-a", shared=SHARED, epsilon_budget=1.5) == []


def test_the_kubernetes_base_ships_a_valid_policy_that_refuses_dense_updates():
    from pathlib import Path
    policy = site_policy.load(Path(__file__).resolve().parents[1] / "k8s/base/participant/site-policy.toml")
    assert "dense" not in policy.model.adapters
    assert policy.egress.max_upload_bytes == 256 << 20


def test_the_noise_a_site_derives_from_a_target_epsilon_is_held_to_the_policy():
    from participant.policy import check_noise

    policy = loads("[privacy]\nmin_noise_multiplier = 1.0\n", "p.toml")
    assert rules(check_noise(policy, 0.68)) == ["privacy.min_noise_multiplier"]
    assert check_noise(policy, 1.2) == [] and check_noise(policy, None) == []
    assert check_noise(SitePolicy(), 0.01) == []


def test_max_global_step_counts_the_runs_server_lr_and_what_secure_aggregation_adds():
    policy = loads("[limits]\nmax_global_step = 120", "p.toml")
    assert check_join(policy, run("[secagg]\nclip_norm = 100.0\n"), site="site-a", shared=SHARED) == []
    lowered = run("").federation
    halved = dataclasses.replace(run(""), federation=dataclasses.replace(lowered, server_lr=0.5))
    assert check_join(loads("[limits]\nmax_global_step = 60", "p.toml"), halved, site="site-a", shared=SHARED) == []
    # SecAgg's rounding adds max_samples_per_site x sqrt(elements) / 2^bits: 4 bits leave too much
    coarse = run("[secagg]\nenabled = true\nthreshold = 2\nbits = 4\n")
    assert rules(check_join(policy, coarse, site="site-a", shared=SHARED)) == ["limits.max_global_step"]
