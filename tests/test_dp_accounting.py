"""Privacy accounting and the site ledger, checked against an independent implementation."""
from __future__ import annotations

import math

import pytest
from dp_accounting import ComposedDpEvent, GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from security.dp import BudgetExceeded, PrivacyLedger, RoundSpend, epsilons, noise_multiplier_for

# (history of rounds, delta): homogeneous and heterogeneous compositions
CASES = [
    ([RoundSpend(0.01, 1.0, 1000)], 1e-5),
    ([RoundSpend(1 / 15, 0.65, 15)] * 3, 1e-4),
    ([RoundSpend(0.05, 1.5, 100), RoundSpend(0.05, 0.9, 60), RoundSpend(0.1, 2.0, 30)], 1e-5),
    ([RoundSpend(0.02, 1.1, 250)] * 2, 1e-6),
]


def _independent(history, delta):
    event = ComposedDpEvent([SelfComposedDpEvent(PoissonSampledDpEvent(s.sample_rate, GaussianDpEvent(s.noise_multiplier)),
                                                 s.steps) for s in history])
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = rdp_privacy_accountant.RdpAccountant(orders=orders)
    rdp.compose(event)
    return pld.get_epsilon(delta), rdp.get_epsilon(delta)


@pytest.mark.parametrize("history,delta", CASES)
def test_ledger_epsilon_matches_dp_accounting_within_one_percent(tmp_path, history, delta):
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite3", "site-a")
    for i, spend in enumerate(history, 1):
        ledger.reserve(run_id="r", round_no=i, attempt_id=f"t{i}", spend=spend, max_grad_norm=1.0, delta=delta,
                       budget=100.0)
    last = ledger.entries()[-1]
    pld, rdp = _independent(history, delta)
    print(f"q/sigma/steps={[(round(s.sample_rate, 4), s.noise_multiplier, s.steps) for s in history]} "
          f"delta={delta:g}: ledger prv {last.eps_cum_prv:.4f} vs dp_accounting PLD {pld:.4f}; "
          f"ledger rdp {last.eps_cum_rdp:.4f} vs dp_accounting RDP {rdp:.4f}")
    assert last.eps_cum_prv == pytest.approx(pld, rel=0.01)
    assert last.eps_cum_rdp == pytest.approx(rdp, rel=0.01)
    assert last.eps_cum_prv <= last.eps_cum_rdp            # PRV is the tighter bound
    # cumulative is composition, not a sum of per-round figures
    if len(history) > 1:
        assert last.eps_cum_prv < sum(e.eps_round_prv for e in ledger.entries())


def test_noise_multiplier_search_hits_the_target():
    sigma = noise_multiplier_for(4.0, 1e-5, 0.05, 200)
    eps = epsilons([RoundSpend(0.05, sigma, 200)], 1e-5)["prv"]
    assert 0.99 * 4.0 <= eps <= 4.0


def test_ledger_hard_stop_survives_reopening_and_records_everything(tmp_path):
    path = tmp_path / "state" / "privacy-ledger.sqlite3"
    ledger = PrivacyLedger(path, "site-a")
    spend = RoundSpend(0.1, 1.0, 10)
    budget = epsilons([spend] * 2, 1e-5)["prv"] * 1.01
    e1 = ledger.reserve(run_id="r", round_no=1, attempt_id="a", spend=spend, max_grad_norm=1.0, delta=1e-5, budget=budget)
    assert e1.state == "reserved"      # counted before training: a crash cannot under-count
    ledger.settle(e1, 10)
    ledger.reserve(run_id="r", round_no=2, attempt_id="b", spend=spend, max_grad_norm=1.0, delta=1e-5, budget=budget)
    ledger.close()
    again = PrivacyLedger(path, "site-a")      # a restart (or a crash after round 2 began)
    with pytest.raises(BudgetExceeded) as err:
        again.reserve(run_id="r", round_no=3, attempt_id="c", spend=spend, max_grad_norm=1.0, delta=1e-5, budget=budget)
    assert err.value.would_be > budget >= err.value.spent
    entries = again.entries()
    assert [e.round for e in entries] == [1, 2] and [e.state for e in entries] == ["spent", "reserved"]
    e = entries[1]
    assert (e.sample_rate, e.steps, e.noise_multiplier, e.max_grad_norm, e.delta) == (0.1, 10, 1.0, 1.0, 1e-5)
    assert e.accountant == "prv" and e.accountant_version.startswith("opacus ")
    assert math.isclose(e.remaining, budget - e.eps_cum_prv)
    # fewer steps than reserved (a step cap) lower the round's figures
    settled = again.settle(e, 5)
    assert settled.steps == 5 and settled.eps_cum_prv < e.eps_cum_prv
    assert "site-a" in again.table()
