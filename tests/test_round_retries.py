"""Rounds that cannot complete, with real processes: a site out of privacy budget, retries that run
out, and a second agent of one site."""
from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest

from ktfed.launcher import _spawn, free_port
from kt_core.config import FederationSettings
from tests.conftest import fast_config
from tests.test_operations import scrape
from tests.test_site_policy_federation import start_site

TWO = ["site-a", "site-b"]
PRIVACY = """
[privacy]
enabled = true
target_epsilon = 4.0
delta = 1e-4
max_grad_norm = 1.0
"""


def _site(federation, site: str, *args: str, state: str | None = None, log: str | None = None):
    """A participant process; `state`/`log` give it a folder and log of its own (a second agent)."""
    cmd = federation.participant_command(site) + list(args)
    if state is not None:
        cmd[cmd.index("--state") + 1] = str(federation.workdir / "sites" / state)
        cmd[cmd.index("--log-file") + 1] = str(federation.workdir / "logs" / f"{log}.log")
    proc = _spawn(cmd, federation.workdir / "logs" / f"{log or site}.out", None)
    federation.participants[log or site] = proc
    return proc


def _run_state(samples: dict) -> str:
    (state,) = [dict(labels)["state"] for name, labels in samples if name == "ktfed_run_info"]
    return state


def test_a_site_out_of_budget_ends_the_run_instead_of_others_training_for_nothing(federation):
    text = fast_config(rounds=3, min_sites=2, sites=TWO, epochs=1, extra=PRIVACY)
    port = free_port()
    federation.start_coordinator(federation.write_config(text), args=["--metrics-listen", f"127.0.0.1:{port}"])
    federation.wait_serving()
    _site(federation, "site-a", "--epsilon-budget", "0.01")   # no round of this run fits
    _site(federation, "site-b")
    status = federation.wait_for(lambda: (s := federation.status()).state.startswith("failed") and s, 120,
                                 "the run to fail")
    assert status.state.startswith("failed: too few sites take part: site-a (budget_exhausted: ")
    assert status.rounds_completed == 0 and status.aborted_attempts == 1   # not retried over and over
    time.sleep(3)   # no further attempt starts once the run has failed
    db = federation.db()
    assert db.execute("SELECT COUNT(*) FROM aborted_attempts").fetchone()[0] == 1
    assert db.execute("SELECT state FROM runs").fetchone()[0] == "failed"   # a restart does not resume it
    assert "failed: too few sites take part" in federation.log()
    (reason,) = db.execute("SELECT reason FROM aborted_attempts").fetchone()
    # site-b's update is not waited for once the decline leaves too few sites for the round
    assert re.match(r"only [01] update\(s\), 2 required; declined: site-a \(budget_exhausted: privacy budget", reason)
    assert _run_state(scrape(port)).startswith("failed: too few sites")
    audit = federation.workdir / "coordinator" / "audit"
    assert any(b"run_failed" in p.read_bytes() for p in audit.rglob("*") if p.is_file())
    # the sites were told the run ended, and stop
    for site in TWO:
        assert federation.participants[site].wait(60) == 0


@pytest.mark.slow   # the same engine path runs fast in process: tests/test_simulate.py
def test_a_site_whose_policy_refuses_the_run_is_not_asked_again_and_the_run_fails_naming_it(federation):
    # site-a's policy takes LoRA adapters only, the run is WAFFLe: it refuses the whole run at join.
    # Retrying the round (10 attempts, a backoff doubling to minutes) could not change that.
    federation.start_coordinator(federation.write_config(fast_config(rounds=2, min_sites=2, sites=TWO, epochs=1)))
    federation.wait_serving()
    start_site(federation, "site-a", "[model]\nadapters = ['lora']\n")
    _site(federation, "site-b")
    status = federation.wait_for(lambda: (s := federation.status()).state.startswith("failed") and s, 120,
                                 "the run to fail")
    assert status.state.startswith("failed: too few sites take part: site-a (run_refused: site policy model.adapters")
    assert "federation.min_sites = 2" in status.state
    assert status.rounds_completed == 0 and status.aborted_attempts == 1
    db = federation.db()
    (reason,) = db.execute("SELECT reason FROM aborted_attempts").fetchone()
    assert re.match(r"only [01] update\(s\), 2 required; declined: site-a \(run_refused: site policy model\.adapters",
                    reason)
    assert db.execute("SELECT code FROM declines").fetchall() == [("run_refused",)]


@pytest.mark.slow   # in process, fast: tests/test_simulate.py
def test_a_run_whose_privacy_target_no_site_can_meet_fails_naming_the_setting_and_the_sites_stay_up(federation):
    # epsilon 0.01 over the run is out of reach at any noise: each site refuses the run at join,
    # tells the coordinator which setting (not its sample rate, which would give away its N), and
    # stays up for the coordinator's next run instead of exiting
    unreachable = PRIVACY.replace("target_epsilon = 4.0", "target_epsilon = 0.01")
    federation.start_coordinator(federation.write_config(
        fast_config(rounds=2, min_sites=2, sites=TWO, epochs=1, extra=unreachable)))
    federation.wait_serving()
    for site in TWO:
        _site(federation, site)
    status = federation.wait_for(lambda: (s := federation.status()).state.startswith("failed") and s, 120,
                                 "the run to fail")
    assert re.match(r"failed: too few sites take part: site-. \(run_refused: run unworkable: privacy\.target_epsilon: "
                    r"no noise multiplier reaches epsilon 0\.01", status.state), status.state
    assert status.aborted_attempts == 1
    reasons = [r for (r,) in federation.db().execute("SELECT reason FROM declines WHERE code = 'run_refused'")]
    assert reasons and all("sample rate" in r and not re.search(r"rate \d", r) for r in reasons), reasons
    time.sleep(2)
    assert all(federation.participants[site].poll() is None for site in TWO), federation.tail_logs()
    for site in TWO:   # the site's own log and audit keep the whole reason
        assert "cannot take part: privacy.target_epsilon" in federation.log(site)
        entries = [json.loads(line) for line in
                   (federation.workdir / "sites" / site / "audit" / "audit.jsonl").read_text().splitlines()]
        refusals = [e["body"] for e in entries if e["kind"] == "refusal" and e["body"]["reason"] == "run unworkable"]
        assert refusals and re.search(r"sample rate \d", refusals[0]["detail"]), refusals


def test_retries_are_bounded_and_the_run_fails_when_they_run_out(federation):
    text = fast_config(rounds=2, min_sites=2, sites=TWO, timeout=0.2)
    text = text.replace("seed = 3\n", "seed = 3\nmax_attempts = 3\nretry_backoff_s = 0.2\n", 1)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    for site in TWO:   # each site holds its update past the 0.2 s round: every attempt aborts
        federation.start_participant(site, env={"KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S": "1"})
    status = federation.wait_for(lambda: (s := federation.status()).state.startswith("failed") and s, 120,
                                 "the run to fail")
    assert status.state.startswith("failed: retries exhausted: round 1 aborted 3 time(s) "
                                   "(federation.max_attempts = 3)")
    time.sleep(2)
    assert federation.status().aborted_attempts == 3
    assert "round 1 will be retried in 0.2s (attempt 2 of 3)" in federation.log()
    assert "round 1 will be retried in 0.4s (attempt 3 of 3)" in federation.log()


def test_a_second_agent_of_a_site_is_refused_and_stops(federation):
    federation.start_coordinator(federation.write_config(fast_config(rounds=1, min_sites=2, sites=TWO)))
    federation.wait_serving()
    _site(federation, "site-a")
    federation.start_participant("site-b", env={"KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S": "20"})   # the round stays open
    federation.wait_for(lambda: all(p.connected for p in federation.status().sites), 90, "both sites")
    second = _site(federation, "site-a", state="site-a-again", log="site-a-again")
    assert second.wait(60) == 3   # refused for good: no flapping
    said = federation.log("site-a-again")
    assert "PERMISSION_DENIED duplicate session: site-a already has a live assignment stream" in said, said
    assert "duplicate session: site-a" in federation.log()
    assert federation.status().state == "running"
    status = federation.wait_rounds(1, timeout=180)   # the first agent was never displaced
    assert list(status.rounds[0].contributors) == TWO
    assert federation.log("site-a").count("joined run") == 1


@pytest.mark.parametrize("field, value", [("max_attempts", 0), ("max_attempts", 1001),
                                          ("retry_backoff_s", -1.0), ("retry_backoff_s", float("nan"))])
def test_retry_settings_out_of_range_are_refused_naming_the_field(field, value):
    fed = dataclasses.replace(FederationSettings(), **{field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):
        fed.validate()
