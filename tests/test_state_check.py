"""A site's check of the coordinator's global states (participant.state_check): every state the
run's own aggregation produces passes, whatever the sites sent; a state further than the rule
allows is refused, naming how far it moved. The end-to-end case, a coordinator process that swaps
the aggregate, is in tests/test_hostile_coordinator.py."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.strategy import strategy_for
from kt_core.config import load_toml
from participant.state_check import StateStepRefused, StateSteps, max_global_step
from tests.conftest import fast_config

PLAIN = ""
CENTRAL_DP = ('[privacy]\nenabled = true\nmechanism = "central"\nupdate_clip_norm = 0.5\n'
              'user_noise_multiplier = 1.5\n')
SERVER_LR = "server_lr = 0.7\n"    # a line of [federation]


def _config(kind: str, rounds: int = 5):
    text = fast_config(rounds=rounds, sites=["s1", "s2", "s3"], extra="" if kind == SERVER_LR else kind)
    if kind == SERVER_LR:
        text = text.replace("[federation]\n", "[federation]\n" + SERVER_LR, 1)
    return load_toml(text)


def _state(rng, scale=1.0):
    return {"w": (rng.normal(size=(6, 5)) * scale).astype(np.float32),
            "b": (rng.normal(size=7) * scale).astype(np.float32)}


def _aggregate(config, state, updates):
    """One round of the run's own strategy over `updates` (update, claimed samples)."""
    strategy = strategy_for(config)
    strategy.begin(state)
    for update, samples in updates:
        strategy.add(update, strategy.weight(samples))
    out = strategy.finish()
    return {n: np.asarray(out[n]) for n in out}


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from([PLAIN, CENTRAL_DP, SERVER_LR]), seed=st.integers(0, 2 ** 16),
       scales=st.lists(st.sampled_from([1e-3, 1.0, 50.0, 1e6]), min_size=1, max_size=4))
def test_every_state_the_runs_own_aggregation_produces_is_taken(kind, seed, scales):
    config = _config(kind)
    rng = np.random.default_rng(seed)
    state = _state(rng)
    steps = StateSteps("run", config)
    steps.accept(0, state)
    for completed in (1, 2):
        updates = [(_state(rng, s), int(rng.integers(1, 10 ** 9))) for s in scales]   # some far past the clip
        state = _aggregate(config, state, updates)
        steps.accept(completed, state)


def test_a_state_moved_further_than_the_rule_allows_is_refused_naming_how_far():
    config = _config(PLAIN)
    rng = np.random.default_rng(0)
    state = _state(rng)
    steps = StateSteps("run", config)
    steps.accept(0, state)
    bound = max_global_step(config, 37)
    assert bound == config.secagg.clip_norm
    swapped = {n: a + np.float32(2 * bound / np.sqrt(37)) for n, a in state.items()}   # two rounds' worth
    with pytest.raises(StateStepRefused, match=r"more than the .* that 1 round\(s\)"):
        steps.accept(1, swapped)
    steps.accept(2, swapped)          # two rounds of the rule can move it that far
    assert steps.last[0] == 2


def test_states_named_out_of_order_or_of_another_shape_are_refused():
    config = _config(PLAIN, rounds=5)
    rng = np.random.default_rng(1)
    state = _state(rng)
    steps = StateSteps("run", config)
    steps.accept(3, state)
    with pytest.raises(StateStepRefused, match="already took the state after 3"):
        steps.accept(2, state)
    with pytest.raises(StateStepRefused, match="of the run's 5"):
        steps.accept(3 + 6, state)
    with pytest.raises(StateStepRefused, match="changed shape"):
        steps.accept(4, {"w": np.zeros((5, 6), np.float32), "b": state["b"]})


def test_the_bound_counts_secure_aggregations_rounding_and_central_noise():
    plain, dp = _config(PLAIN), _config(CENTRAL_DP)
    secure = _config("[secagg]\nenabled = true\nclip_norm = 3.0\nbits = 16\n")
    assert max_global_step(secure, 10_000) == pytest.approx(3.0 + 10_000 * 100 / 65536)
    assert max_global_step(dp, 100) == pytest.approx(0.5 + 1.5 * 0.5 * (10 + 10))
    assert max_global_step(plain, 100) == plain.secagg.clip_norm
    assert max_global_step(_config(SERVER_LR), 100) == pytest.approx(0.7 * plain.secagg.clip_norm)


def test_the_first_state_is_measured_from_the_round_0_model_the_site_built():
    config = _config(PLAIN, rounds=5)
    rng = np.random.default_rng(2)
    initial = _state(rng)
    StateSteps("run", config, initial).accept(0, initial)          # round 1 names the round-0 model itself
    other = _state(rng)                                             # a model the site did not build
    with pytest.raises(StateStepRefused, match="built from the run's seed"):
        StateSteps("run", config, initial).accept(0, other)
    # a site joining after 3 rounds: at most 3 rounds' worth from its round-0 model
    step = {n: a + np.float32(2.5 * config.secagg.clip_norm / np.sqrt(37)) for n, a in initial.items()}
    StateSteps("run", config, initial).accept(3, step)
    with pytest.raises(StateStepRefused):
        StateSteps("run", config, initial).accept(2, step)
