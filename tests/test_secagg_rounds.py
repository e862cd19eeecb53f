"""Whole SecAgg rounds through the in-memory driver: exact sums under dropouts, SecAgg+,
refusal below threshold, float updates within the stated error bound, the active option."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import Phase, event, given, settings as hsettings, strategies as st

from security.secagg import (STEPS, SecAggError, SecAggProtocolSettings, clip_l2, error_bound, run_round,
                             simulate)

PROPS = hsettings(max_examples=80, deadline=None,
                  phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
DROP = st.sampled_from([None] * 6 + list(STEPS))


def ids(n):
    return [f"site-{i}" for i in range(n)]


def expected_sets(roster, dropouts):
    """U1..U5 for a complete graph from the dropout pattern."""
    sets = []
    for step in STEPS:
        sets.append({u for u in roster if u not in dropouts or STEPS.index(step) < STEPS.index(dropouts[u])})
    return sets


def no_leak(trace, t, strict=True):
    """No participant's self-mask share and mask-key share were both revealed, and (complete graph,
    `strict`) when the round did not complete no secret was revealed by t or more holders.
    (With SecAgg+ a round can fail at the very end because one neighbourhood lost all its holders;
    self-mask seeds of survivors may then be recoverable, but each survivor's input stays masked
    by the pairwise mask of a surviving neighbour, whose mask key is never revealed.)"""
    revealed = {}
    for c in trace.clients.values():
        for peer, kind in c.revealed.items():
            revealed.setdefault(peer, {}).setdefault(kind, 0)
            revealed[peer][kind] += 1
    for peer, kinds in revealed.items():
        assert len(kinds) == 1, f"both shares of {peer} revealed"
        if strict and trace.result is None:
            assert max(kinds.values()) < t


def mod_sum(vectors):
    total = np.zeros_like(vectors[0], dtype=np.uint64)
    for v in vectors:
        total += v
    return (total % 2**32).astype(np.uint32)


@hsettings(PROPS, max_examples=150)
@given(st.integers(2, 8), st.integers(1, 20), st.data())
def test_exact_sum_of_survivors_complete_graph(n, m, data):
    roster = ids(n)
    h = n
    t = data.draw(st.integers(h // 2 + 1, h), label="t")
    drops = {u: d for u in roster if (d := data.draw(DROP, label=u)) is not None}
    inputs = {u: np.array(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=m, max_size=m)),
                          dtype=np.uint32) for u in roster}
    sets = expected_sets(roster, drops)
    ok = all(len(s) >= t for s in sets)
    event("completes" if ok else "refused")
    event(f"dropouts: {len(drops)}")
    if ok:
        trace = run_round(inputs, SecAggProtocolSettings(threshold=t), dropouts=drops)
        assert set(trace.result.survivors) == sets[3 - 1]  # U3: sent masked input
        assert np.array_equal(trace.result.total, mod_sum([inputs[u] for u in sets[2]]))
        no_leak(trace, t)
    else:
        with pytest.raises(SecAggError, match="fewer than threshold") as err:
            run_round(inputs, SecAggProtocolSettings(threshold=t), dropouts=drops)
        assert err.value.trace.result is None
        no_leak(err.value.trace, t)


@PROPS
@given(st.integers(5, 14), st.data())
def test_exact_sum_secagg_plus(n, data):
    k = data.draw(st.integers(2, n - 2), label="k")
    roster = ids(n)
    drops = {u: d for u in roster if (d := data.draw(DROP, label=u)) is not None}
    inputs = {u: np.random.default_rng(i).integers(0, 2**32, 7, dtype=np.uint32) for i, u in enumerate(roster)}
    s = SecAggProtocolSettings(neighbours=k)
    try:
        trace = run_round(inputs, s, dropouts=drops, on_refusal="drop", graph_seed=bytes(data.draw(st.binary(min_size=16, max_size=16))))
    except SecAggError as err:
        # dropouts crowded into one neighbourhood: refused cleanly, nothing leaked
        assert "server:" in str(err)
        assert drops, "a round without dropouts must complete"
        no_leak(err.trace, s.threshold_for(n), strict=False)
        return
    assert np.array_equal(trace.result.total, mod_sum([inputs[u] for u in trace.result.survivors]))
    assert set(trace.result.survivors) <= expected_sets(roster, drops)[2]
    no_leak(trace, s.threshold_for(n), strict=False)


@PROPS
@given(st.integers(2, 8), st.integers(1, 30), st.integers(8, 20), st.floats(0.5, 50), st.data())
def test_dequantized_sum_within_bound_of_float_sum(n, m, bits, clip, data):
    from hypothesis.extra.numpy import arrays
    roster = ids(n)
    s = SecAggProtocolSettings(clip_norm=clip, bits=bits)
    try:
        s.validate(n)
    except SecAggError:
        return
    t = s.threshold_for(n)
    # drop at most n - t participants, after key sharing or after masked input
    drops = {}
    for u in roster[: n - t]:
        d = data.draw(st.sampled_from([None, "masked_input", "consistency", "unmask"]), label=u)
        if d:
            drops[u] = d
    updates = {u: data.draw(arrays(np.float64, m, elements=st.floats(-100, 100)), label=u) for u in roster}
    counts = {u: data.draw(st.integers(0, 10**6), label=f"count {u}") for u in roster}
    total, count, trace = simulate(updates, counts, s, dropouts=drops, rng=np.random.default_rng(0))
    survivors = trace.result.survivors
    expect = sum(clip_l2(updates[u], clip) for u in survivors)
    assert count == sum(counts[u] for u in survivors)
    assert np.all(np.abs(total - expect) < error_bound(len(survivors), bits) + 1e-9 * clip * n)


def test_five_sites_one_drops_after_sharing_one_after_masking():
    rng = np.random.default_rng(0)
    roster = ids(5)
    inputs = {u: rng.integers(0, 2**32, 1000, dtype=np.uint32) for u in roster}
    trace = run_round(inputs, SecAggProtocolSettings(threshold=3),
                      dropouts={"site-1": "masked_input", "site-3": "unmask"})
    r = trace.result
    assert r.survivors == ("site-0", "site-2", "site-3", "site-4") and r.dropped == ("site-1",)
    assert r.responders == ("site-0", "site-2", "site-4")
    assert np.array_equal(r.total, mod_sum([inputs[u] for u in r.survivors]))


def test_fewer_than_t_survivors_refuses_and_reveals_nothing():
    roster = ids(5)
    inputs = {u: np.arange(4, dtype=np.uint32) for u in roster}
    drops = {"site-0": "masked_input", "site-1": "masked_input", "site-2": "masked_input"}
    with pytest.raises(SecAggError, match="only 2 participants sent masked input, fewer than threshold t=3") as err:
        run_round(inputs, SecAggProtocolSettings(threshold=3), dropouts=drops)
    trace = err.value.trace
    assert trace.server.stage == "aborted" and trace.result is None
    assert all(not c.revealed for c in trace.clients.values())
    # too few unmask responders: the few that answered revealed < t shares of anything
    drops = {"site-0": "unmask", "site-1": "unmask", "site-2": "unmask"}
    with pytest.raises(SecAggError, match="only 2 participants sent unmasking shares") as err:
        run_round(inputs, SecAggProtocolSettings(threshold=3), dropouts=drops)
    no_leak(err.value.trace, 3)


def test_server_never_holds_an_individual_input():
    roster = ids(4)
    inputs = {u: np.full(64, i + 1, dtype=np.uint32) for i, u in enumerate(roster)}
    trace = run_round(inputs, SecAggProtocolSettings())
    for u, y in trace.server.inputs.items():
        assert not np.array_equal(y, inputs[u])
        assert np.count_nonzero(y == inputs[u]) < 3
    assert np.array_equal(trace.result.total, np.full(64, 10, dtype=np.uint32))


def test_secagg_plus_cost_grows_with_k_not_n():
    per_client = {}
    for n in (20, 60):
        roster = [f"p{i:03d}" for i in range(n)]
        inputs = {u: np.zeros(16, dtype=np.uint32) for u in roster}
        trace = run_round(inputs, SecAggProtocolSettings(neighbours=4))
        sk = trace.server.shares
        assert all(len(m.shares) == 4 for m in sk.values())
        assert all(len(r.acks) == 5 for r in trace.server.requests.values())
        per_client[n] = trace.bytes_up["share_keys"] / n
    assert abs(per_client[60] - per_client[20]) < 0.02 * per_client[20]
    # the complete graph, by contrast, grows with n
    roster = [f"p{i:03d}" for i in range(20)]
    trace = run_round({u: np.zeros(16, dtype=np.uint32) for u in roster}, SecAggProtocolSettings())
    assert all(len(m.shares) == 19 for m in trace.server.shares.values())


def test_secagg_plus_with_spread_dropouts_is_exact():
    roster = [f"p{i:02d}" for i in range(30)]
    rng = np.random.default_rng(3)
    inputs = {u: rng.integers(0, 2**32, 100, dtype=np.uint32) for u in roster}
    drops = {"p03": "masked_input", "p17": "unmask", "p25": "share_keys"}
    trace = run_round(inputs, SecAggProtocolSettings(neighbours=6), dropouts=drops)
    assert np.array_equal(trace.result.total, mod_sum([inputs[u] for u in trace.result.survivors]))
    assert "p03" in trace.result.dropped


@pytest.mark.parametrize("keytype", ["ed25519", "ecdsa"])
def test_active_option_signed_round(keytype):
    roster = ids(4)
    make = ed25519.Ed25519PrivateKey.generate if keytype == "ed25519" else lambda: ec.generate_private_key(ec.SECP256R1())
    keys = {u: make() for u in roster}
    signers = {u: (k if u != "site-2" else k.sign if keytype == "ed25519" else k) for u, k in keys.items()}
    inputs = {u: np.full(8, 5, dtype=np.uint32) for u in roster}
    trace = run_round(inputs, SecAggProtocolSettings(active=True), signers=signers,
                      verify_keys={u: k.public_key() for u, k in keys.items()},
                      dropouts={"site-0": "masked_input"})
    assert np.array_equal(trace.result.total, np.full(8, 15, dtype=np.uint32))


def test_isolated_site_with_other_global_state_is_caught():
    roster = ids(4)
    inputs = {u: np.zeros(4, dtype=np.uint32) for u in roster}
    with pytest.raises(SecAggError, match="global state mismatch"):
        run_round(inputs, SecAggProtocolSettings(), state_hashes={"site-2": hashlib.sha256(b"other model").digest()})
