"""The auditor's check of each site's policy against what the site sent (ktfed/audit_policy.py), on
logs written by the site's own recorder (participant.audit_trail.SiteAudit over security.audit):
a compliant run holds, a run whose settings and crossings the policy forbids is flagged rule by
rule, the site's own refusals are listed, and a recorded policy is rebuilt exactly or named."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ktfed.audit_policy import check_site, check_sites, recorded_policy, restored
from ktfed.audit_report import write_report
from kt_core.config import load_toml
from kt_core.wire.transport import TLSFiles
from participant.audit_trail import SiteAudit
from participant.policy import SitePolicy, loads
from security.audit import verify
from tests.conftest import fast_config
from tests.test_audit_log import TENSORS, make_audit_pki

POLICY = """
[egress]
tensor_patterns = ["layers.*"]
max_upload_bytes = 4096
[privacy]
max_epsilon_per_run = 10.0
"""
HEAD = {"name": "head.weight", "shape": [32, 32], "dtype": "float32", "nbytes": 4096}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_audit_pki(tmp_path_factory.mktemp("audit-policy") / "pki")


def site_log(folder, pki, site: str = "site-a") -> SiteAudit:
    return SiteAudit(folder, site, TLSFiles.from_pki(pki, site), "coordinator")


def run_config(adapter: str = "waffle") -> dict:
    """A run config as the coordinator sends it (its JSON), which the site records at join."""
    return json.loads(load_toml(fast_config(adapter=adapter)).to_json())


def upload(audit: SiteAudit, run: str, round_no: int, tensors) -> None:
    audit.boundary(run, "send", round_no, "update", f"{round_no:064x}", tensors)


def write_two_runs(folder, pki, policy: SitePolicy) -> None:
    """run-ok keeps the policy; run-bad asks for dense updates and sends a tensor, and bytes, the
    policy does not allow; in round 3 the site refuses (the policy holding) and declines."""
    audit = site_log(folder, pki)
    audit.config("run-ok", run_config(), policy)
    for r in (1, 2):
        upload(audit, "run-ok", r, TENSORS)
    audit.config("run-bad", run_config(adapter="dense"), policy)
    for r in (1, 2):
        upload(audit, "run-bad", r, TENSORS + [HEAD])
    audit.refusal("run-bad", 3, "task", "site policy limits.max_rounds_per_run", "round 3 is past 2 rounds")
    audit.boundary("run-bad", "send", 3, "decline", "0" * 64)
    audit.close("finished")


def test_a_kept_policy_holds_and_a_crossing_it_forbids_is_flagged(tmp_path, pki):
    policy = loads(POLICY, "site-a.toml")
    write_two_runs(tmp_path / "site-a", pki, policy)
    result = verify([tmp_path / "site-a"], pki / "ca.crt", partial=True)
    assert result.ok, result.summary()
    (check,) = check_sites(result)
    assert check.status == "violated" and check.crossings == 4
    found = {(v["rule"], v["run"]): v for v in check.to_dict()["violations"]}
    assert set(found) == {("model.adapters", "run-bad"), ("egress.tensor_patterns", "run-bad"),
                          ("egress.max_upload_bytes", "run-bad")}
    tensors = found[("egress.tensor_patterns", "run-bad")]
    assert tensors["rounds"] == [1, 2] and tensors["crossings"] == 2 and tensors["first"].startswith("update (seq")
    assert "'head.weight'" in tensors["detail"]
    assert "7168 bytes, more than 4096" in found[("egress.max_upload_bytes", "run-bad")]["detail"]
    assert check.refusals == [{"run": "run-bad", "round": 3, "seq": check.refusals[0]["seq"], "message": "task",
                               "rule": "limits.max_rounds_per_run", "detail": "round 3 is past 2 rounds"}]
    assert check.line().startswith(f"site-a: policy {policy.digest()[:12]}: 3 violation(s) (egress.max_upload_bytes")

    # the same log read for the compliant run only: held
    (ok,) = check_sites(verify([tmp_path / "site-a"], pki / "ca.crt", partial=True, runs=["run-ok"]))
    assert ok.status == "held" and ok.line() == (f"site-a: policy {policy.digest()[:12]} held "
                                                 "(2 messages sent, each judged against it)")
    # the same crossings under a stricter byte limit: each upload of the compliant run is flagged
    stricter = loads(POLICY.replace("4096", "1024"), "stricter.toml")
    views = with_policy(verify([tmp_path / "site-a"], pki / "ca.crt", partial=True, runs=["run-ok"]).logs, stricter)
    (row,) = check_site("site-a", views, ["run-ok"]).to_dict()["violations"]
    assert row["rule"] == "egress.max_upload_bytes" and row["rounds"] == [1, 2] and row["crossings"] == 2


def test_the_report_shows_the_policy_beside_the_flags(tmp_path, pki):
    policy = loads(POLICY, "site-a.toml")
    write_two_runs(tmp_path / "site-a", pki, policy)
    paths = write_report(verify([tmp_path / "site-a"], pki / "ca.crt", partial=True), tmp_path / "report")
    page = paths["html"].read_text()
    assert "<h2>5. Each site's policy beside what crossed</h2>" in page
    assert policy.digest()[:16] in page and "<code>egress.max_upload_bytes = 4096</code>" in page
    assert "3 violation(s)</b> in 4 messages sent" in page
    assert "<b><code>egress.tensor_patterns</code></b> run run-bad, round(s) 1-2 (2 crossing(s)" in page
    # the site's own refusal is listed with the rule, and its decline row carries that reason
    assert "<code>limits.max_rounds_per_run</code>" in page and "round 3 is past 2 rounds" in page
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["site_policies"][0]["status"] == "violated"
    assert data["declines"] == [{"site": "site-a", "run": "run-bad", "round": 3,
                                 "reason": "round 3 is past 2 rounds"}]


def test_the_dp_ledger_beyond_the_policys_epsilon_is_flagged(tmp_path, pki):
    policy = loads("[privacy]\nrequired = true\nmax_epsilon_per_run = 2.0\nmin_noise_multiplier = 0.8\n", "p.toml")
    audit = site_log(tmp_path / "site-a", pki)
    config = run_config()
    config["privacy"] = {**config["privacy"], "enabled": True, "noise_multiplier": 1.0}
    audit.config("run-dp", config, policy)
    for r, eps in ((1, 1.5), (2, 2.5)):
        audit.log.log_dp(run="run-dp", round=r, level="record", sample_rate=0.1, noise_multiplier=0.6, steps=10,
                         max_grad_norm=1.0, delta=1e-5, epsilon_round=1.5, epsilon_cumulative=eps, budget=None,
                         accountant="prv", accountant_version="opacus 1.6.0")
        upload(audit, "run-dp", r, TENSORS)
    audit.close("finished")
    (check,) = check_sites(verify([tmp_path / "site-a"], pki / "ca.crt", partial=True))
    found = {v["rule"]: v for v in check.to_dict()["violations"]}
    assert found["privacy.max_epsilon_per_run"]["rounds"] == [2]    # round 1 spent 1.5, within 2
    assert "epsilon 2.5 spent, above 2" in found["privacy.max_epsilon_per_run"]["detail"]
    assert found["privacy.min_noise_multiplier"]["rounds"] == [1, 2]


def test_a_recorded_policy_is_rebuilt_exactly_or_named(tmp_path, pki):
    policy = loads(POLICY, "site-a.toml")
    audit = site_log(tmp_path / "site-a", pki)
    audit.config("run-1", run_config(), policy)
    # a site that rewrote its rules but kept the digest (signed by itself, so the chain verifies)
    audit.log.log_config(run="run-2", config=run_config(), policy_sha256=policy.digest(), policy_source="x.toml",
                         policy={**json.loads(policy.to_json()), "egress": {"max_upload_bytes": 0}})
    upload(audit, "run-2", 1, TENSORS)
    audit.close("finished")
    views = verify([tmp_path / "site-a"], pki / "ca.crt", partial=True).logs
    entries = [e for e in views[0].entries if e.kind == "config"]
    # the log keeps floats as text: read back, the same policy and the same digest
    assert entries[0].body["policy"]["privacy"]["max_epsilon_per_run"] == "10.0"
    assert restored(SitePolicy, entries[0].body["policy"])["privacy"]["max_epsilon_per_run"] == 10.0
    assert recorded_policy(entries[0].body).digest() == policy.digest()
    check = check_site("site-a", views)
    assert check.status == "incomplete" and check.unchecked == 1
    assert "the recorded rules hash to" in check.problems[0] and "not fully judged" in check.line()


def test_a_site_without_a_policy_entry_says_so(tmp_path, pki):
    audit = site_log(tmp_path / "site-a", pki)
    audit.config("run-1", run_config())   # an agent from before site policies
    upload(audit, "run-1", 1, TENSORS)
    audit.close("finished")
    (check,) = check_sites(verify([tmp_path / "site-a"], pki / "ca.crt", partial=True))
    assert check.status == "none" and check.line() == "site-a: no site policy recorded (1 messages sent unjudged)"


def with_policy(views, policy: SitePolicy):
    """Verified logs as they are, but each `config` entry holding `policy` instead (in memory):
    what the same crossings would have been judged against under stricter rules."""
    table = json.loads(policy.to_json())
    return [dataclasses.replace(v, entries=[
        dataclasses.replace(e, body={**e.body, "policy_sha256": policy.digest(), "policy": table})
        if e.kind == "config" and "policy" in e.body else e for e in v.entries]) for v in views]
