"""`ktfed demo` (what `make demo` runs), end to end as a user would run it."""
import os
import re
import subprocess
import sys

import pytest

from tests.test_vln_federation import backbone  # noqa: F401 - the module-scoped pretrained checkpoint


def assert_every_policy_held(stdout: str) -> None:
    """The summary's line per site: its policy judged, from its audit log, against what it sent."""
    for site in ("site-a", "site-b", "site-c"):
        assert re.search(rf"^{site}: policy [0-9a-f]{{12}} held \(\d+ messages sent", stdout, re.M), stdout


@pytest.mark.slow
def test_image_demo_runs_a_federation_and_prints_the_summary(tmp_path):
    workdir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "ktfed", "demo", "--task", "image", "--rounds", "2",
                          "--workdir", str(workdir)], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.split()[:1] == ["2"] for line in lines), out.stdout  # the round-2 row of the table
    assert "finished: 2 rounds" in out.stdout
    assert "dense FedAvg of the same model would send" in out.stdout
    assert (workdir / "accuracy.png").stat().st_size > 0
    assert (workdir / "coordinator" / "coordinator.sqlite3").exists()
    assert "secure aggregation: on in 2 of 2 rounds" in out.stdout
    # beside each site's federated result: its initial model and the site trained alone, same budget
    for site in ("site-a", "site-b", "site-c"):
        assert re.search(rf"^  {site}: initial \d\.\d{{3}}, local-only \d\.\d{{3}}, federated \d\.\d{{3}} "
                         rf"\([+-]\d\.\d{{3}} from federating\)$", out.stdout, re.M), out.stdout
    assert (workdir / "baselines" / "site-a" / "privacy-ledger.sqlite3").exists()  # local-only spent its own epsilon
    assert "audit logs (4 producers, hash-chained and signed): verified" in out.stdout
    # under the demo's policy: factorized updates, secure aggregation and record-level DP required
    assert "differential privacy: record-level DP-SGD at every site" in out.stdout
    assert "secagg.required = true" in out.stdout and "privacy.required = true" in out.stdout
    assert_every_policy_held(out.stdout)


@pytest.mark.slow
def test_vln_demo_hosts_the_backbone_and_reports_navigation(tmp_path, backbone):
    """The default demo, with a small pretrained checkpoint in place of the demo's own (which
    `make demo` builds once and caches)."""
    workdir = tmp_path / "demo"
    env = {**os.environ, "KTFED_DEMO_BACKBONE": str(backbone), "KTFED_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "ktfed", "demo", "--rounds", "2", "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "adaptation of the hosted VLN backbone on BabyAI" in out.stdout
    assert "finished: 2 rounds" in out.stdout
    assert "navigation after the run" in out.stdout and "success rate" in out.stdout
    assert "success rate per round" in out.stdout   # the rollouts after each round ([vln] round_rollout_episodes)
    # beside each site's federated result: the backbone alone and the site trained alone
    for site in ("site-a", "site-b", "site-c"):
        assert re.search(rf"^  {site}: backbone \d\.\d\d / \d\.\d\d, local-only \d\.\d\d / \d\.\d\d, "
                         rf"federated \d\.\d\d / \d\.\d\d$", out.stdout, re.M), out.stdout
    assert "audit logs (4 producers, hash-chained and signed): verified" in out.stdout
    assert "secagg.required = true" in out.stdout and "privacy.required = false" in out.stdout
    assert_every_policy_held(out.stdout)


def test_demo_refuses_a_workdir_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    out = subprocess.run([sys.executable, "-m", "ktfed", "demo", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "was not made by `ktfed demo`" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_demo_policies_require_secagg_and_dp_for_images_and_take_dense_only_when_asked(tmp_path):
    from kt_core.config import load_toml
    from ktfed.launcher import DemoSettings, Federation, demo_config, write_policies
    from participant.policy import check_join, load

    sites, fed = ["site-a", "site-b", "site-c"], Federation(tmp_path, "127.0.0.1:1")
    for task, adapter in (("image", "waffle"), ("image", "dense"), ("vln", "waffle")):
        settings = DemoSettings(workdir=tmp_path, task=task, adapter=adapter)
        write_policies(fed, settings, sites)
        policy = load(fed.policy_file("site-a"))
        assert policy.secagg.required and policy.privacy.required == (task == "image")
        assert ("dense" in policy.model.adapters) == (adapter == "dense")
        if task == "image":   # the demo's own run config meets its policy
            config = load_toml(demo_config(settings, sites)).resolved()
            assert check_join(policy, config, site="site-a", shared={}) == []
            # the image recipe's dictionary multiplier (ktfed.launcher, MODEL_IMAGE) is in the config
            assert config.model.dict_lr_scale == 4.0


def test_the_navigation_demos_held_out_level_is_one_no_pretraining_or_site_used():
    from ktfed.demo_backbone import DEMO_PRETRAIN
    from ktfed.launcher import DEMO_HELD_OUT, DEMO_SITE_LEVELS

    assert DEMO_HELD_OUT not in DEMO_PRETRAIN.levels and DEMO_HELD_OUT not in DEMO_SITE_LEVELS


def test_the_navigation_demos_sites_hold_levels_pretraining_never_used_each_its_own():
    # what a site ends with is then what adapting taught it, not what the backbone already knew
    from ktfed.demo_backbone import DEMO_PRETRAIN
    from ktfed.launcher import DEMO_SITE_LEVELS

    assert not set(DEMO_SITE_LEVELS) & set(DEMO_PRETRAIN.levels)
    assert len(set(DEMO_SITE_LEVELS)) == len(DEMO_SITE_LEVELS)


def test_the_image_demos_comparison_lines_pair_each_site_with_its_baselines():
    from ktfed.demo_baselines import report, report_accuracy

    baselines = {"site-a": {"backbone": {"test_accuracy": 0.25}, "local_only": {"test_accuracy": 0.8}},
                 "site-b": {"backbone": {"test_accuracy": 0.1}, "local_only": {"test_accuracy": 0.7}}}
    lines = report_accuracy(baselines, {"site-a": 0.9, "site-b": 0.65})
    assert lines[1] == "  site-a: initial 0.250, local-only 0.800, federated 0.900 (+0.100 from federating)"
    assert lines[2] == "  site-b: initial 0.100, local-only 0.700, federated 0.650 (-0.050 from federating)"
    assert report(baselines, {}) == []   # no rollouts: the navigation lines are not printed
    assert report_accuracy(baselines, {"site-a": 0.9}) == lines[:2]   # a site without a final round is left out


def test_the_accuracy_plot_draws_each_sites_local_only_reference(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from ktfed.report import RoundTable

    table = RoundTable(["site-a", "site-b"])
    table.accuracy = {"site-a": [(0, 0.1), (1, 0.5), (2, 0.7)], "site-b": [(0, 0.2), (1, 0.4), (2, 0.6)]}
    plain = table.plot(tmp_path / "plain.png", "t")
    with_alone = table.plot(tmp_path / "alone.png", "t", {"site-a": 0.9, "site-b": 0.3})
    assert imread(plain).shape == imread(with_alone).shape
    assert (imread(plain) != imread(with_alone)).any()   # the dashed lines (and their legend) are drawn
    # the navigation task's success-rate panel takes its own reference lines
    table.success = {"site-a": [(0, 0.0), (1, 0.3)], "site-b": [(0, 0.0), (1, 0.2)]}
    sr_plain = table.plot(tmp_path / "sr.png", "t", {"site-a": 0.9})
    sr_alone = table.plot(tmp_path / "sr_alone.png", "t", {"site-a": 0.9}, {"site-a": 0.35, "site-b": 0.25})
    assert imread(sr_plain).shape == imread(sr_alone).shape != imread(plain).shape   # two panels
    assert (imread(sr_plain) != imread(sr_alone)).any()


def test_a_reference_points_metric_is_read_for_the_sites_that_have_it():
    from ktfed.demo_baselines import metric_of

    baselines = {"site-a": {"local_only": {"test_accuracy": 0.7, "success_rate": 0.3}},
                 "site-b": {"local_only": {"test_accuracy": 0.6}}, "site-c": {}}
    assert metric_of(baselines, "local_only") == {"site-a": 0.7, "site-b": 0.6}
    assert metric_of(baselines, "local_only", "success_rate") == {"site-a": 0.3}
