"""A site spends epsilon only on what it released: attempts the coordinator aborted, in the ledger.

An attempt whose update never left the site (the egress guard stopped it, the deadline passed
before it was ready, secure aggregation ended before the masked input) is withheld: the site's
model goes back to before that training and the ledger row adds epsilon 0. An update that did
leave stays spent when the coordinator then aborts the attempt, and the row says so; the retry's
spend is a row of its own. First the site's privacy engine on its own (a real model and DP-SGD),
then real federations.
"""
from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from kt_core.config import load_toml
from participant.trainer import LocalTrainer
from security.dp import PrivacyLedger, RoundSpend, epsilons
from security.dp.ledger import LEDGER_FILE, SCHEMA
from tests.conftest import fast_config

TWO = ["site-a", "site-b"]
# a budget that fits every attempt these tests make: what they check is which attempts count
PRIVACY = """
[privacy]
enabled = true
noise_multiplier = 1.0
epsilon_budget = 1000.0
delta = 1e-4
max_grad_norm = 1.0
"""


def _retries(text: str, attempts: int, backoff: float = 0.2) -> str:
    return text.replace("seed = 3\n", f"seed = 3\nmax_attempts = {attempts}\nretry_backoff_s = {backoff}\n", 1)


def _ledger(federation, site: str) -> PrivacyLedger:
    return PrivacyLedger(federation.workdir / "sites" / site / LEDGER_FILE, site)


def _ledger_cli(federation, site: str, *extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ktfed", "privacy", "ledger", "--site", site, "--state",
                          str(federation.workdir / "sites" / site), *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _wait_failed(federation, timeout: float = 180):
    return federation.wait_for(lambda: (s := federation.status()).state.startswith("failed") and s, timeout,
                               "the run to fail")


def _wait_finished(federation, timeout: float = 240):
    return federation.wait_for(lambda: (s := federation.status()).state == "finished" and s, timeout,
                               "the run to finish")


# -- the site's privacy engine on its own -------------------------------------------------------

def _dp_trainer(tmp_path) -> LocalTrainer:
    config = load_toml(fast_config(sites=TWO, epochs=1, extra=PRIVACY)).resolved()
    return LocalTrainer("site-a", "run-1", config, tmp_path)


def _model_state(trainer: LocalTrainer) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy().copy() for name, value in trainer.model.state_dict().items()}


def test_a_withheld_attempt_is_undone_and_costs_nothing_a_released_one_stays_spent_when_aborted(tmp_path):
    trainer = _dp_trainer(tmp_path)
    privacy = trainer.privacy
    before = _model_state(trainer)

    trainer.train(1, 32, 0.05, 0, 1, round_no=1, attempt_id="aa")
    trained = _model_state(trainer)
    assert any(not np.array_equal(before[k], trained[k]) for k in before)     # DP-SGD moved the model
    assert privacy.metrics()["epsilon"] > 0
    assert privacy.withhold("aa", "the egress guard stopped the update")
    restored = _model_state(trainer)
    assert all(np.array_equal(before[k], restored[k]) for k in before)        # back to before the training
    (row,) = trainer.ledger.entries()
    assert row.state == "withheld" and row.eps_round_prv == 0 and row.eps_cum_prv == 0
    assert row.steps > 0 and row.note == "the egress guard stopped the update"   # what DP-SGD ran, kept
    assert privacy.metrics()["epsilon"] == 0

    # the retry of round 1: released, then the coordinator aborts that attempt too
    assert not privacy.next_attempt(1, "bb")
    trainer.train(1, 32, 0.05, 0, 1, round_no=1, attempt_id="bb")
    privacy.released("bb")
    assert not privacy.withhold("bb", "too late")         # once released, it cannot be taken back
    assert not privacy.next_attempt(1, "cc")                 # a second retry: attempt "bb" was aborted
    withheld, spent = trainer.ledger.entries()
    assert (withheld.attempt, spent.attempt) == ("aborted", "aborted") and spent.state == "spent"
    one_round = epsilons([spent.spend], spent.delta)["prv"]
    assert spent.eps_cum_prv == pytest.approx(one_round)  # the withheld attempt is not in the composition

    # the retry's own row; a later round says nothing about it having been aborted
    trainer.train(1, 32, 0.05, 0, 1, round_no=1, attempt_id="cc")
    privacy.released("cc")
    privacy.next_attempt(2, "dd")
    rows = trainer.ledger.entries()
    assert [r.attempt for r in rows] == ["aborted", "aborted", ""]
    assert rows[-1].eps_cum_prv == pytest.approx(epsilons([spent.spend, rows[-1].spend], spent.delta)["prv"])
    table = trainer.ledger.table()
    assert "withheld (eps 0), attempt aborted" in table and "spent, attempt aborted" in table
    assert "attempt aborted: round 1 was retried" in table


def test_secure_aggregation_outcome_is_asked_when_the_attempt_ends(tmp_path):
    trainer = _dp_trainer(tmp_path)
    privacy = trainer.privacy
    trainer.train(1, 32, 0.05, 0, 1, round_no=1, attempt_id="aa")
    privacy.release_later("aa", lambda: False)            # the masked input never went out
    assert privacy.next_attempt(1, "bb")                     # undone: the caller saves the private factors
    trainer.train(1, 32, 0.05, 0, 1, round_no=1, attempt_id="bb")
    privacy.release_later("bb", lambda: True)
    assert not privacy.next_attempt(2, "cc")
    first, second = trainer.ledger.entries()
    assert (first.state, first.attempt) == ("withheld", "aborted") and (second.state, second.attempt) == ("spent", "")
    # the run ends after 1 round: attempts of round 2 did not complete
    trainer.train(1, 32, 0.05, 0, 1, round_no=2, attempt_id="cc")
    privacy.release_later("cc", lambda: True)
    privacy.run_finished(1)
    assert [(e.round, e.state, e.attempt) for e in trainer.ledger.entries()][-1] == (2, "spent", "aborted")


def test_an_older_ledger_file_gains_the_new_columns(tmp_path):
    # the schema before rows had an attempt and a note
    old_schema = re.sub(r"at REAL NOT NULL,\n    attempt[^\n]*\n    note[^\n]*\n", "at REAL NOT NULL);\n", SCHEMA,
                        count=1)
    db = sqlite3.connect(tmp_path / LEDGER_FILE)
    db.executescript(old_schema)
    assert "attempt" not in {r[1] for r in db.execute("PRAGMA table_info(entries)")}
    db.execute("INSERT INTO entries (site, run_id, round, attempt_id, level, sample_rate, steps, noise_multiplier, "
               "max_grad_norm, delta, eps_round_prv, eps_round_rdp, eps_cum_prv, eps_cum_rdp, budget, remaining, "
               "accountant, accountant_version, params_json, state, at) VALUES ('site-a', 'r', 1, 't', 'record', "
               "0.1, 10, 1.0, 1.0, 1e-5, 0.5, 0.6, 0.5, 0.6, 5.0, 4.5, 'prv', 'v', '{}', 'spent', 0)")
    db.commit()
    db.close()
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, "site-a")
    (row,) = ledger.entries()
    assert (row.state, row.attempt, row.note) == ("spent", "", "")
    ledger.reserve(run_id="r", round_no=2, attempt_id="u", spend=RoundSpend(0.1, 1.0, 10), max_grad_norm=1.0,
                   delta=1e-5, budget=5.0)
    assert len(ledger.entries()) == 2



def test_a_ledger_from_before_the_renames_keeps_its_rows_under_attempt_id(tmp_path):
    # ledgers written before one name per concept called the coordinator's attempt id task_id:
    # a site must not lose the history its budget rests on when it upgrades
    db = sqlite3.connect(tmp_path / LEDGER_FILE)
    db.executescript(SCHEMA.replace("attempt_id TEXT", "task_id TEXT"))
    db.execute("INSERT INTO entries (site, run_id, round, task_id, level, sample_rate, steps, noise_multiplier, "
               "max_grad_norm, delta, eps_round_prv, eps_round_rdp, eps_cum_prv, eps_cum_rdp, budget, remaining, "
               "accountant, accountant_version, params_json, state, at) VALUES ('site-a', 'r', 1, 'ab', 'record', "
               "0.1, 10, 1.0, 1.0, 1e-5, 0.5, 0.6, 0.5, 0.6, 5.0, 4.5, 'prv', 'v', '{}', 'spent', 0)")
    db.commit()
    db.close()
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, "site-a")
    (row,) = ledger.entries()
    assert (row.attempt_id, row.state, row.eps_cum_prv) == ("ab", "spent", 0.5)
    ledger.record_decline(run_id="r", round_no=2, attempt_id="cd", reason="budget", spent=0.5, would_be=6.0,
                          budget=5.0, accountant="prv")
    assert [d["attempt_id"] for d in ledger.declines()] == ["cd"]

# -- real federations ---------------------------------------------------------------------------

@pytest.mark.slow
def test_an_update_the_guard_stopped_costs_nothing_and_a_released_one_stays_spent(federation):
    """site-b's egress guard stops every update (it would carry the private factors): it releases
    nothing, and its ledger adds nothing. site-a released its update in both attempts, which the
    coordinator aborted (one update of two required): both rows stay spent and are marked aborted,
    the first when its retry arrived, the second when the run ended without completing round 1."""
    text = _retries(fast_config(rounds=1, min_sites=2, sites=TWO, epochs=1, timeout=4, extra=PRIVACY), 2)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    federation.start_participant("site-a")
    federation.start_participant("site-b", env={"KTFED_FAULT_LEAK_PRIVATE": "1"})
    status = _wait_failed(federation)
    assert status.state.startswith("failed: retries exhausted: round 1 aborted 2 time(s)")
    for site in TWO:
        assert federation.participants[site].wait(60) == 0

    b = _ledger(federation, "site-b").entries()
    assert [(e.round, e.state) for e in b] == [(1, "withheld"), (1, "withheld")]
    assert all(e.eps_round_prv == 0 and e.eps_cum_prv == 0 and e.steps > 0 for e in b)
    assert b[0].attempt == "aborted" and "egress guard" in b[0].note
    a = _ledger(federation, "site-a").entries()
    assert [(e.round, e.state) for e in a] == [(1, "spent"), (1, "spent")] and a[0].attempt_id != a[1].attempt_id
    assert a[0].attempt == a[1].attempt == "aborted" and "the run ended after 0 round(s)" in a[1].note
    assert a[1].eps_cum_prv == pytest.approx(epsilons([a[0].spend, a[1].spend], a[1].delta)["prv"])

    shown = _ledger_cli(federation, "site-b")
    assert "withheld (eps 0), attempt aborted" in shown and "the egress guard stopped the update" in shown
    assert "spent, attempt aborted" in _ledger_cli(federation, "site-a")
    data = json.loads(_ledger_cli(federation, "site-a", "--json"))
    assert [e["attempt"] for e in data["entries"]] == ["aborted", "aborted"]


@pytest.mark.slow
def test_an_update_not_ready_by_the_deadline_is_not_sent_and_costs_nothing(federation):
    """Rounds far shorter than DP-SGD takes: each site's update is ready after the deadline, so it
    is not sent (the coordinator would refuse it) and the attempt costs the site no epsilon."""
    # a 0.2 s round against 8 epochs of DP-SGD (hundreds of steps): no update is ever ready in time
    text = _retries(fast_config(rounds=1, min_sites=2, sites=TWO, epochs=8, timeout=0.2, extra=PRIVACY), 2)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    for site in TWO:
        federation.start_participant(site)
    _wait_failed(federation)
    for site in TWO:
        assert federation.participants[site].wait(60) == 0
        rows = _ledger(federation, site).entries()
        assert len(rows) == 2 and all(e.state == "withheld" and e.eps_cum_prv == 0 for e in rows), rows
        assert rows[0].attempt == "aborted" and "deadline passed" in rows[0].note
        assert "the deadline passed before the update was ready: not sent" in federation.log(site)
    assert federation.db().execute("SELECT COUNT(*) FROM uploads").fetchone()[0] == 0


@pytest.mark.slow
def test_a_site_killed_after_the_other_uploaded_the_retry_is_a_row_of_its_own(federation):
    """site-a uploads; site-b holds its update back and is killed, so the attempt aborts. Both
    sites' first rows stay spent (site-b had handed its update to the upload: it may have left)
    and are marked aborted when the retry arrives, site-b's by its restarted process; the retry,
    which completes, is a second row."""
    text = _retries(fast_config(rounds=1, min_sites=2, sites=TWO, epochs=1, extra=PRIVACY), 3)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    federation.start_participant("site-a")
    federation.start_participant("site-b", env={"KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S": "120"})
    federation.wait_for(lambda: federation.db().execute("SELECT COUNT(*) FROM uploads").fetchone()[0] == 0
                        and "pausing" in federation.log("site-b") and "round 1: accuracy" in federation.log("site-a"),
                        180,
                        "site-a to upload while site-b holds its update")
    federation.participants["site-b"].send_signal(signal.SIGKILL)
    federation.participants["site-b"].wait(10)
    federation.wait_for(lambda: federation.db().execute("SELECT COUNT(*) FROM aborted_attempts").fetchone()[0], 120,
                        "the attempt to abort")
    federation.start_participant("site-b")
    status = _wait_finished(federation)
    assert sorted(status.rounds[0].contributors) == TWO
    for site in TWO:
        rows = _ledger(federation, site).entries()
        assert [(e.round, e.state, e.attempt) for e in rows] == [(1, "spent", "aborted"), (1, "spent", "")], rows
        assert rows[1].eps_cum_prv == pytest.approx(epsilons([r.spend for r in rows], rows[1].delta)["prv"])
        assert "spent, attempt aborted" in _ledger_cli(federation, site)


@pytest.mark.slow
def test_secure_aggregation_that_ends_before_the_masked_input_costs_nothing(federation):
    """site-b and site-c die once they advertised their keys: the attempt aborts below the
    threshold before site-a sent its masked input, so site-a's row is withheld. The dead sites'
    rows stay spent (a crashed site cannot tell what it sent). Restarted, all three complete the retry."""
    secagg = "\n[secagg]\nenabled = true\nstep_timeout_s = 15\n"
    text = fast_config(rounds=1, min_sites=2, epochs=1, extra=PRIVACY + secagg)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    federation.start_participant("site-a")
    for site in ("site-b", "site-c"):
        federation.start_participant(site, env={"KTFED_FAULT_EXIT_AFTER_SECAGG_STEP": "advertise"})
    federation.wait_for(lambda: federation.db().execute("SELECT COUNT(*) FROM aborted_attempts").fetchone()[0], 180,
                        "the attempt to abort")
    for site in ("site-b", "site-c"):
        assert federation.participants[site].wait(60) == 17
        federation.start_participant(site)
    status = _wait_finished(federation)
    assert status.rounds[0].secagg and len(status.rounds[0].contributors) == 3
    a = _ledger(federation, "site-a").entries()
    assert [(e.state, e.attempt) for e in a] == [("withheld", "aborted"), ("spent", "")], a
    assert "masked input" in a[0].note and a[1].eps_cum_prv == pytest.approx(a[1].eps_round_prv)
    for site in ("site-b", "site-c"):
        rows = _ledger(federation, site).entries()
        assert [(e.state, e.attempt) for e in rows] == [("spent", "aborted"), ("spent", "")], rows
