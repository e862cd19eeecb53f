"""The site policy with real processes: a coordinator whose run breaks a site's rule gets a Decline
naming it and not one tensor; the same site then takes part in a compliant run, also when the
operator weakens the settings of the next run after a compliant one."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from ktfed import policy_cmd
from ktfed.audit_policy import check_site
from kt_core.wire.transport import TLSFiles
from participant.policy import loads
from security.audit import verify
from tests.conftest import fast_config
from tests.test_audit_policy import with_policy


def start_site(fed, site: str, policy_text: str | None, env: dict | None = None):
    """A participant process, `ktfed participant run --policy FILE` with this policy."""
    args = []
    if policy_text is not None:
        path = fed.workdir / f"{site}-policy.toml"
        path.write_text(policy_text)
        args = ["--policy", str(path)]
    return fed.start_participant(site, env=env, args=args)


def declines(fed, run_id: str) -> dict[str, str]:
    # run_refused: the policy refuses the whole run (at join); site_policy: one round of it
    rows = fed.db().execute("SELECT site_id, reason FROM declines WHERE run_id = ? "
                            "AND code IN ('site_policy', 'run_refused')",
                            (run_id,)).fetchall()
    return {site_id: reason for site_id, reason in rows}


def uploaded_bytes(fed, run_id: str, site: str) -> int:
    (total,) = fed.db().execute("SELECT COALESCE(SUM(bytes), 0) FROM uploads WHERE run_id = ? AND site_id = ?",
                                (run_id, site)).fetchone()
    return total


def site_refusals(fed, site: str) -> list[dict]:
    path = fed.workdir / "sites" / site / "audit"
    entries = [json.loads(line) for f in sorted(path.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return [e for e in entries if e["kind"] == "refusal"]


SITES = ["site-a", "site-b", "site-c", "site-x"]
# Each site's rule, broken by the first run (waffle, 3 rounds, no SecAgg) and kept by the second
# (lora, 1 round).
POLICIES = {
    "site-a": ("[model]\nadapters = ['lora']\n", "model.adapters"),
    "site-b": ("[limits]\nmax_rounds_per_run = 2\n", "limits.max_rounds_per_run"),
    "site-c": ("[egress]\ntensor_patterns = ['*lora*', '*.bias']\n", "egress.tensor_patterns"),
    "site-x": ("[model]\ntasks = ['image']\nadapters = ['lora', 'ffa_lora']\n[limits]\nmax_runs_per_day = 5\n",
               "model.adapters"),
}


def test_sites_decline_a_run_their_policy_forbids_then_join_a_compliant_run(federation):
    federation.start_coordinator()
    federation.wait_serving()
    first = federation.client.start(fast_config(rounds=3, min_sites=1, timeout=10, sites=SITES)).header.run_id
    for site in SITES:
        start_site(federation, site, POLICIES[site][0])
    federation.wait_for(lambda: set(declines(federation, first)) == set(SITES), 120, "every site to decline")
    for site, (_, rule) in POLICIES.items():
        assert rule in declines(federation, first)[site]
        assert f"site policy {rule}" in federation.log(site)
        assert uploaded_bytes(federation, first, site) == 0
        refused = [e["body"] for e in site_refusals(federation, site) if e["body"]["run"] == first]
        assert refused and all(e["reason"].startswith("site policy ") for e in refused)
    # the coordinator's received bytes: nothing from anyone
    (count,) = federation.db().execute("SELECT COUNT(*) FROM uploads WHERE run_id = ?", (first,)).fetchone()
    assert count == 0
    federation.client.stop(first, "test: the sites refused it")
    second = federation.client.start(fast_config(rounds=1, min_sites=4, timeout=60, sites=SITES,
                                                 adapter="lora")).header.run_id
    status = federation.wait_for(lambda: (s := federation.client.status(second)).state == "finished" and s, 180,
                                 "the compliant run to finish")
    assert sorted(status.rounds[0].contributors) == SITES
    assert declines(federation, second) == {}
    for site in SITES:
        assert uploaded_bytes(federation, second, site) > 0
        assert federation.participants[site].wait(30) == 0
        configs = [json.loads(line)["body"] for f in (federation.workdir / "sites" / site / "audit").glob("*.jsonl")
                   for line in f.read_text().splitlines() if json.loads(line)["kind"] == "config"]
        assert {c["run"] for c in configs} >= {first, second}
        assert all(c["policy_sha256"] and c["policy_source"].endswith(f"{site}-policy.toml") for c in configs)
        state = federation.workdir / "sites" / site
        assert policy_cmd.policy_held(state, second) == (True, f"policy {configs[0]['policy_sha256'][:12]} held")
        held, line = policy_cmd.policy_held(state, first)
        assert not held and POLICIES[site][1] in line


def test_explain_says_rule_by_rule_and_a_wrong_coordinator_is_not_joined(federation, capsys):
    federation.start_coordinator(federation.write_config(fast_config(rounds=1, min_sites=1)))
    federation.wait_serving()
    tls = TLSFiles.from_pki(federation.pki, "site-a")
    state = federation.workdir / "sites" / "site-a"
    assert policy_cmd.explain(federation.address, "site-a", tls, None, state) == 0
    assert "site-a would take part" in capsys.readouterr().out
    policy = federation.workdir / "p.toml"
    policy.write_text("[secagg]\nrequired = true\n[coordinator]\nname = 'coordinator'\n")
    assert policy_cmd.explain(federation.address, "site-a", tls, str(policy), state) == 1
    out = capsys.readouterr().out
    assert "secagg.required" in out and "REFUSED: the run does not use secure aggregation" in out
    assert "coordinator.name" in out and "would decline" in out
    # a policy naming another coordinator: the site does not join at all (exit 3)
    policy.write_text("[coordinator]\nname = 'site-b'\n")
    proc = start_site(federation, "site-a", policy.read_text())
    assert proc.wait(60) == 3
    assert "site policy coordinator.name" in federation.log("site-a") and "'coordinator'" in federation.log("site-a")


def test_a_bad_policy_file_stops_the_site_before_it_connects(federation):
    proc = start_site(federation, "site-a", "[secagg]\nrequired = true\nmin_threshold = 9\nmax_sites = 3\n")
    assert proc.wait(60) == 2
    out = (federation.workdir / "logs" / "site-a.out").read_text()
    assert "site-a-policy.toml: secagg.min_threshold: t=9 is larger than secagg.max_sites 3" in out


@pytest.mark.slow
def test_a_roster_that_drops_below_the_policys_minimum_is_refused_at_that_step(federation):
    secagg = "\n[secagg]\nenabled = true\n"
    config = federation.write_config(fast_config(rounds=1, min_sites=3, timeout=30, extra=secagg))
    federation.start_coordinator(config)
    federation.wait_serving()
    policy = "[secagg]\nrequired = true\nmin_sites = 3\n"
    start_site(federation, "site-a", policy)
    start_site(federation, "site-b", policy)
    federation.start_participant("site-c", env={"KTFED_FAULT_EXIT_AFTER_SECAGG_STEP": "advertise"})
    federation.wait_for(lambda: "secagg.min_sites" in federation.log("site-a"), 180,
                        "site-a to refuse the shrunken roster")
    assert "secagg/masked_input" in federation.log("site-a")
    status = federation.status()
    assert status.rounds_completed == 0
    refused = [e["body"] for e in site_refusals(federation, "site-a")]
    assert any(r["message"] == "secagg/masked_input" and "min_sites" in r["reason"] for r in refused)
    # the site sent no masked input: its last secagg message out was its key sharing
    assert "secure aggregation complete" not in federation.log("site-a")


def test_cli_check_exit_codes(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[secagg]\nrequired = true\n")
    bad.write_text("[secagg]\nrequird = true\n")
    out = subprocess.run([sys.executable, "-m", "ktfed", "participant", "policy", "check", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "secagg.requird: unknown field" in out.stderr and str(bad) in out.stderr
    out = subprocess.run([sys.executable, "-m", "ktfed", "participant", "policy", "check", str(good)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "secagg.required = true" in out.stdout


def ktfed(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktfed", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def operator_starts(fed, config_text: str, name: str) -> str:
    """The operator's own command: `ktfed run start --config FILE`; returns the new run's id."""
    path = fed.workdir / name
    path.write_text(config_text)
    done = ktfed("run", "start", "--coordinator", fed.address, "--pki", fed.pki, "--config", path, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["run_id"]


def site_sends(fed, site: str, run_id: str) -> list[str]:
    """The messages this site's audit log says it sent in the run."""
    path = fed.workdir / "sites" / site / "audit"
    entries = [json.loads(line) for f in sorted(path.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return [e["body"]["message"] for e in entries if e["kind"] == "boundary" and e["body"]["run"] == run_id
            and e["body"]["direction"] == "send"]


@pytest.mark.slow
def test_a_next_run_with_weaker_settings_is_declined_and_the_site_joins_a_compliant_one_after(federation, tmp_path):
    sites, policy = ["site-a", "site-b"], "[secagg]\nrequired = true\n"
    secure = fast_config(rounds=1, min_sites=2, sites=sites, epochs=1, extra="\n[secagg]\nenabled = true\n")
    federation.start_coordinator()
    federation.wait_serving()
    first = operator_starts(federation, secure, "secure.toml")
    for site in sites:
        start_site(federation, site, policy)
    federation.wait_for(lambda: federation.client.status(first).state == "finished", 180, "the compliant run")
    for site in sites:
        assert federation.participants[site].wait(30) == 0   # a site's agent ends with its run

    # The operator starts the next run with secure aggregation off; the sites' agents come back
    # (as their deployment restarts them) with the same state and policy, and decline it.
    weaker = operator_starts(federation, fast_config(rounds=1, min_sites=2, sites=sites, epochs=1,
                                                     timeout=10), "plain.toml")
    for site in sites:
        start_site(federation, site, policy)
    # the first refusal leaves one site, fewer than min_sites: the run fails at once, naming it
    status = federation.wait_for(lambda: (s := federation.client.status(weaker)).state.startswith("failed") and s,
                                 120, "the weaker run to fail")
    assert "(run_refused: site policy secagg.required: the run does not use secure aggregation)" in status.state
    assert status.rounds_completed == 0 and status.aborted_attempts == 1
    declined = declines(federation, weaker)
    assert declined and all("secagg.required" in why for why in declined.values())
    for site in sites:
        assert uploaded_bytes(federation, weaker, site) == 0
        assert set(site_sends(federation, site, weaker)) <= {"decline"}   # no tensor left the site
    for site in declined:
        refused = [e["body"] for e in site_refusals(federation, site) if e["body"]["run"] == weaker]
        assert refused and {r["reason"] for r in refused} == {"site policy secagg.required"}

    # still joinable: the same agents take part in the operator's next compliant run
    done = ktfed("run", "stop", "--coordinator", federation.address, "--pki", federation.pki, "--run-id", weaker)
    assert done.returncode == 0, done.stderr
    third = operator_starts(federation, secure, "secure-again.toml")
    status = federation.wait_for(lambda: (s := federation.client.status(third)).state == "finished" and s, 180,
                                 "the next compliant run")
    assert sorted(status.rounds[0].contributors) == sites
    for site in sites:
        assert federation.participants[site].wait(30) == 0
        assert "secagg/masked_input" in site_sends(federation, site, third)

    # the auditor: each site's policy held over all three runs, the refusals listed beside it
    dirs = [federation.workdir / "coordinator" / "audit"] + [federation.workdir / "sites" / s / "audit" for s in sites]
    # strict: a site countersigns the seal of a run its policy refused, too
    done = ktfed("audit", "report", *dirs, "--pki", federation.pki, "--out", tmp_path / "report")
    assert done.returncode == 0, done.stdout + done.stderr
    for site in sites:
        assert re.search(rf"{site}: policy [0-9a-f]{{12}} held \(\d+ messages sent, each judged against it\); "
                         r"it refused \d+ time\(s\) by its policy \(secagg.required\)", done.stdout), done.stdout
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<code>secagg.required = true</code>" in page and "No site refused anything" not in page
    # the same real crossings judged under a policy they break: every masked input is flagged
    result = verify(dirs, federation.pki / "ca.crt", partial=True)
    views = [v for v in result.logs if v.producer == "site-a"]
    strict = loads(policy + "[egress]\nmax_upload_bytes = 1024\n", "stricter.toml")
    rows = check_site("site-a", with_policy(views, strict)).to_dict()["violations"]
    assert {(r["rule"], r["run"], r["crossings"]) for r in rows} == {("egress.max_upload_bytes", first, 1),
                                                                     ("egress.max_upload_bytes", third, 1)}
    assert all("a masked input of" in r["detail"] and r["first"].startswith("secagg/masked_input") for r in rows)


# One rule of each kind that a run's settings can break at join, each held by its own site; the
# run (record-level DP-SGD, secure aggregation with t = 6 of 11) breaks every one of them.
JOIN_RULES = {
    "site-a": ("[model]\ntasks = ['vln']\n", "model.tasks"),
    "site-b": ("[egress]\nmax_upload_bytes = 100\n", "egress.max_upload_bytes"),
    "site-c": ("[privacy]\nlevels = ['user']\n", "privacy.levels"),
    "site-d": ("[privacy]\nmax_epsilon_per_run = 1.0\n", "privacy.max_epsilon_per_run"),
    "site-e": ("[privacy]\nmax_delta = 1e-6\n", "privacy.max_delta"),
    "site-f": ("[privacy]\nmax_clip_norm = 0.01\n", "privacy.max_clip_norm"),
    "site-g": ("[privacy]\nmax_epsilon_lifetime = 2.0\n", "privacy.max_epsilon_lifetime"),
    "site-h": ("[secagg]\nrequired = true\nactive_required = true\n", "secagg.active_required"),
    "site-i": ("[secagg]\nrequired = true\nmin_threshold = 8\n", "secagg.min_threshold"),
    "site-j": ("[secagg]\nrequired = true\nmin_sites = 9\n", "secagg.min_sites"),
    # the run names a target epsilon: the site derives its noise multiplier and checks that
    "site-k": ("[privacy]\nmin_noise_multiplier = 50.0\n", "privacy.min_noise_multiplier"),
}


@pytest.mark.slow
def test_each_join_rule_refuses_a_real_run_that_breaks_it_naming_the_rule_and_sending_nothing(federation):
    from security.pki import issue

    sites = sorted(JOIN_RULES)
    for site in sites:    # the federation's PKI holds certificates for the suite's usual sites only
        if not (federation.pki / "issued" / f"{site}.crt").exists():
            issue(federation.pki, site, "participant")
    extra = ("\n[privacy]\nenabled = true\ntarget_epsilon = 8.0\ndelta = 1e-4\nmax_grad_norm = 1.0\n"
             "\n[secagg]\nenabled = true\nthreshold = 6\n")
    federation.start_coordinator()
    federation.wait_serving()
    run = federation.client.start(fast_config(rounds=2, min_sites=6, timeout=30, sites=sites, epochs=1,
                                              extra=extra)).header.run_id
    for site in sites:
        start_site(federation, site, JOIN_RULES[site][0])
    # all six are in the first attempt (min_sites = 6); the first refusal leaves five, so the run
    # fails at once and the later declines may find no round to answer
    status = federation.wait_for(lambda: (s := federation.client.status(run)).state.startswith("failed") and s,
                                 240, "the run to fail")
    assert status.state.startswith("failed: too few sites take part: ") and "run_refused: site policy" in status.state
    declined = declines(federation, run)
    assert declined
    for site, (_, rule) in JOIN_RULES.items():
        assert site not in declined or rule in declined[site], (site, declined[site])
        assert f"site policy {rule}" in federation.log(site)
        assert uploaded_bytes(federation, run, site) == 0
        assert set(site_sends(federation, site, run)) <= {"decline"}     # no tensor, no SecAgg step
        refused = [e["body"] for e in site_refusals(federation, site) if e["body"]["run"] == run]
        assert refused and any(r["reason"] == f"site policy {rule}" for r in refused)
    assert federation.client.status(run).rounds_completed == 0
