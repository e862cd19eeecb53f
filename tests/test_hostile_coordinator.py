"""A hostile coordinator, with real processes: it puts a model of its own in place of the sites'
mean after round 1 (tests/fault_harness.py, KTFED_FAULT_SHIFT_STATE). Each site measures the state
it is sent against the last one it took (participant.state_check), refuses it, says why in its
decline, its log and its audit log, and trains nothing on it."""
from __future__ import annotations

import json

import pytest

from tests.conftest import fast_config

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b"]


def _start(federation, rounds: int) -> None:
    """A coordinator that swaps its first aggregate for a model 10 away in every element, and two
    honest sites."""
    config = federation.write_config(fast_config(rounds=rounds, min_sites=2, timeout=20, sites=SITES))
    federation.start_coordinator(config, env={"KTFED_FAULT_SHIFT_STATE": "10"})
    federation.wait_serving()
    for site in SITES:
        federation.start_participant(site)


def test_sites_refuse_a_global_state_the_runs_aggregation_could_not_have_produced(federation):
    _start(federation, rounds=3)

    def declines():
        return federation.db().execute(
            "SELECT round, site_id, code, reason FROM declines WHERE code = 'global_state_refused'").fetchall()

    rows = federation.wait_for(lambda: len({r[1] for r in declines()}) == 2 and declines(), 120,
                               "both sites to refuse round 2's state")
    assert {r[0] for r in rows} == {2}
    assert all("lies" in r[3] and "more than the" in r[3] for r in rows), rows
    assert "fault injection: adding 10" in federation.log()
    status = federation.status()
    assert status.rounds_completed == 1 and status.state == "running"
    for site in SITES:
        assert "global state" in federation.log(site) and "refused" in federation.log(site)
        entries = [json.loads(line) for line in (federation.workdir / "sites" / site / "audit" / "audit.jsonl")
                   .read_text().splitlines()]
        assert any(e.get("rule") == "global state step" or "global state step" in json.dumps(e) for e in entries)


def test_a_final_state_the_rule_could_not_have_produced_is_not_taken(federation):
    # one round: the swapped aggregate is the run's final state, which no assignment names
    _start(federation, rounds=1)
    status = federation.wait_rounds(1, timeout=120)
    for site in SITES:
        assert federation.participants[site].wait(60) == 0
        state = federation.workdir / "sites" / site
        assert not list(state.glob("adapted-*.safetensors"))     # the coordinator's model is not kept
        (evaluation,) = state.glob("evaluation-*.json")
        kept = json.loads(evaluation.read_text())
        assert kept["model"].startswith("last local model"), kept
        assert "refused" in federation.log(site)
    assert status.rounds_completed == 1


def test_a_round_asking_for_more_local_work_than_any_run_may_is_declined_and_the_sites_stay_up(federation):
    # 10^6 epochs a round would keep a site training for good: the site checks the round's settings
    # as it checks the run's, before it downloads anything, declines and waits for the next round
    text = fast_config(rounds=2, min_sites=2, timeout=20, sites=SITES).replace(
        "seed = 3\n", "seed = 3\nmax_attempts = 3\nretry_backoff_s = 10\n", 1)
    federation.start_coordinator(federation.write_config(text), env={"KTFED_FAULT_ROUND_EPOCHS": "1000000"})
    federation.wait_serving()
    for site in SITES:
        federation.start_participant(site)

    def declines():
        return federation.db().execute("SELECT site_id, code, reason FROM declines").fetchall()

    rows = federation.wait_for(lambda: len({r[0] for r in declines()}) == 2 and declines(), 120,
                               "both sites to decline the round")
    assert all(code == "site_policy" and reason.startswith("round train: epochs: must be an integer between 1 "
                                                           "and 1000") for _, code, reason in rows), rows
    assert all(proc.poll() is None for proc in federation.participants.values()), federation.tail_logs()
    assert federation.status().rounds_completed == 0
    for site in SITES:
        entries = [json.loads(line) for line in (federation.workdir / "sites" / site / "audit" / "audit.jsonl")
                   .read_text().splitlines()]
        assert any(e["kind"] == "refusal" and e["body"]["reason"] == "round train" for e in entries), entries
        received = [(e["body"]["message"], e["body"]["round"]) for e in entries if e["kind"] == "boundary"
                    and e["body"]["direction"] == "receive"]
        # nothing downloaded for the round (a run that ends sends its final state: round 0 here)
        assert ("assignment", 1) in received and not any(m == "state" and r >= 1 for m, r in received), received
