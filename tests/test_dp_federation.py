"""Differential privacy with real processes: the budget hard stop, across a SIGKILL and restart."""
from __future__ import annotations

import contextlib
import json
import signal
import sqlite3

import pytest

from kt_core.config import load_toml
from kt_core.data import load_dataset, site_split
from security.dp import PrivacyLedger, RoundSpend, epsilon, noise_multiplier_for
from security.dp.engine import plan_round
from security.dp.ledger import LEDGER_FILE
from tests.conftest import fast_config

PRIVACY = """
[privacy]
enabled = true
target_epsilon = 8.0
delta = 1e-4
max_grad_norm = 1.0
"""


def _start_site(federation, site: str, budget: float | None = None, env: dict | None = None):
    # through LocalFederation.start_participant: a fault asked for in `env` runs in the harness
    args = ["--epsilon-budget", str(budget)] if budget is not None else []
    return federation.start_participant(site, env=env, args=args)


def _ledger(federation, site: str) -> PrivacyLedger:
    return PrivacyLedger(federation.workdir / "sites" / site / LEDGER_FILE, site)


@pytest.mark.slow
def test_small_budget_site_stops_others_continue_and_it_still_refuses_after_sigkill(federation):
    rounds = 5
    text = fast_config(rounds=rounds, min_sites=2, epochs=1, extra=PRIVACY)
    # site-a's own budget is stricter than the run's (8.0 over all rounds): it fits two rounds
    n = len(site_split(load_dataset("digits"), ["site-a", "site-b", "site-c"], "site-a",
                       load_toml(text).data.partition)[1])
    plan = plan_round(n, 32, 1)
    sigma = noise_multiplier_for(8.0, 1e-4, plan.sample_rate, plan.steps * rounds)
    eps = [epsilon([RoundSpend(plan.sample_rate, sigma, plan.steps * k)], 1e-4) for k in (2, 3)]
    budget = round((eps[0] + eps[1]) / 2, 3)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    # the others pause before each upload, so rounds last long enough for site-a to restart in one
    slow = {"KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S": "2.5"}
    _start_site(federation, "site-a", budget=budget)
    _start_site(federation, "site-b", env=slow)
    _start_site(federation, "site-c", env=slow)
    federation.wait_for(lambda: "declined" in federation.log("site-a"), 180, "site-a to decline a round")

    ledger = _ledger(federation, "site-a")
    entries = ledger.entries()
    assert entries and all(e.state == "spent" for e in entries)
    last = entries[-1]
    assert last.eps_cum_prv <= budget + 1e-9 and last.budget == budget
    declines = ledger.declines()
    assert declines and declines[0]["eps_would_be"] > budget            # the next round would not fit
    assert declines[0]["round"] == len(entries) + 1
    fitted = len(entries)
    assert fitted == 2

    # its decline reaches the coordinator before the kill (the site's ledger row is written first:
    # on a loaded machine the answer can still be on its way)
    federation.wait_for(lambda: _coordinator_declines(federation) >= 1, 60,
                        "the coordinator to record site-a's decline")

    # SIGKILL the exhausted site and start it again: its ledger is on disk, it still refuses.
    # The others are held (SIGSTOP) meanwhile, so the run cannot finish before the restarted site
    # is back and asked again, however slowly it starts on a loaded machine.
    others = [federation.participants[s] for s in ("site-b", "site-c")]
    for proc in others:
        proc.send_signal(signal.SIGSTOP)
    try:
        federation.participants["site-a"].send_signal(signal.SIGKILL)
        federation.participants["site-a"].wait(10)
        log_before = len(federation.log("site-a"))
        _start_site(federation, "site-a", budget=budget)
        federation.wait_for(lambda: "joined run" in federation.log("site-a")[log_before:], 120,
                            "the restarted site-a to join")
    finally:
        for proc in others:
            proc.send_signal(signal.SIGCONT)
    federation.wait_for(lambda: "declined" in federation.log("site-a")[log_before:], 120,
                        "the restarted site-a to decline a round")
    status = federation.wait_rounds(rounds, timeout=240)
    assert status.state == "finished"
    restarted_log = federation.log("site-a")[log_before:]
    assert "spent so far" in restarted_log and "past this site's budget" in restarted_log
    assert len(_ledger(federation, "site-a").entries()) == fitted     # nothing trained after the restart

    # the others trained every round, site-a only the rounds that fit
    for rec in status.rounds:
        assert {"site-b", "site-c"} <= set(rec.contributors)
        assert ("site-a" in rec.contributors) == (rec.round <= fitted)
        if rec.round > fitted and "site-a" in rec.declined:
            assert "site-a" not in rec.dropped
    info = {p.site_id: p for p in status.sites}
    assert info["site-a"].privacy_status == "budget_exhausted"
    assert info["site-a"].epsilon_budget == pytest.approx(budget)
    assert info["site-a"].epsilon_spent == pytest.approx(last.eps_cum_prv, rel=1e-6)
    assert "privacy budget" in info["site-a"].decline_reason
    for site in ("site-b", "site-c"):
        assert info[site].privacy_status == "ok"
        assert 0 < info[site].epsilon_spent <= 8.0 + 1e-6
        assert len(_ledger(federation, site).entries()) == rounds
    # uploads carry epsilon in their metrics; the coordinator recorded the declines and the DP parameters
    assert "site-b/epsilon" in status.rounds[-1].metrics
    db = federation.db()
    assert _coordinator_declines(federation) >= 2   # before the kill and after
    (params,) = db.execute("SELECT params_json FROM privacy_params").fetchone()
    assert '"target_epsilon": 8.0' in params


@pytest.mark.slow
def test_central_dp_fedavg_with_real_processes_records_user_level_epsilon(federation):
    central = """
[privacy]
enabled = true
mechanism = "central"
update_clip_norm = 0.5
user_noise_multiplier = 1.0
delta = 1e-3
"""
    config = federation.write_config(fast_config(rounds=3, min_sites=3, extra=central))
    federation.start_coordinator(config)
    federation.wait_serving()
    for site in ("site-a", "site-b", "site-c"):
        federation.start_participant(site)
    status = federation.wait_rounds(3, timeout=180)
    assert status.state == "finished"
    db = sqlite3.connect(federation.workdir / "coordinator" / "coordinator.sqlite3")
    rows = db.execute("SELECT round, mechanism, contributors, noise_std, epsilon_prv, epsilon_rdp "
                      "FROM privacy_rounds ORDER BY round").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3] and all(r[1] == "central" for r in rows)
    # N(0, (z S / n)^2) with z = 1, S = 0.5, n = 3 sites, server lr 1
    assert all(r[2] == 3 and abs(r[3] - 0.5 / 3) < 1e-9 for r in rows)
    eps = [r[4] for r in rows]
    assert eps[0] < eps[1] < eps[2]
    assert all(abs(r[4] - r[5]) / r[5] < 0.5 for r in rows)  # PRV and RDP tell the same story
    (params,) = db.execute("SELECT COUNT(*) FROM privacy_params").fetchone()
    assert params == 1


@pytest.mark.slow
def test_distributed_noise_shares_under_secure_aggregation(federation):
    """User-level DP with distributed noise: each site clips its whole update and adds its share
    of the noise before masking; the coordinator only ever sees the noisy sum, and records the
    user-level epsilon of every round for the auditor."""
    extra = """
[privacy]
enabled = true
mechanism = "distributed"
update_clip_norm = 1.0
user_noise_multiplier = 1.0
min_survivors = 2
delta = 1e-5

[secagg]
enabled = true
clip_norm = 400.0
bits = 16
"""
    text = fast_config(rounds=2, min_sites=3, epochs=1, extra=extra)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    for site in ("site-a", "site-b", "site-c"):
        federation.start_participant(site)
    status = federation.wait_for(lambda: (s := federation.status()).state == "finished" and s, 180,
                                 "the run to finish")
    assert all(r.secagg for r in status.rounds)
    rows = federation.db().execute("SELECT round, mechanism, contributors, noise_std, epsilon_prv, epsilon_rdp "
                                   "FROM privacy_rounds ORDER BY round").fetchall()
    assert [r[0] for r in rows] == [1, 2]
    assert all(r[1] == "distributed" and r[2] == 3 and r[3] == 0.0 for r in rows)  # no central noise
    assert rows[0][4] < rows[1][4]   # epsilon accumulates over rounds
    summary = json.loads(federation.db().execute("SELECT summary_json FROM secagg_rounds WHERE round = 1")
                         .fetchone()[0])
    assert summary["weight_scale"] == 1   # user-level DP weighs sites equally


def _coordinator_declines(federation) -> int:
    with contextlib.closing(federation.db()) as db:
        return db.execute("SELECT COUNT(*) FROM declines WHERE site_id = 'site-a' "
                          "AND code = 'budget_exhausted'").fetchone()[0]
