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
from kt_core import codec
from kt_core.config import load_toml
from kt_core.wire import convert
from kt_core.wire import federation_pb2 as pb
from participant.audit_trail import NoAudit
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


# -- what the site downloads: the layout a coordinator declares, before any chunk is read ----------

class _Stream:
    """A scripted DownloadState reply (the coordinator is the adversary here): counts what the
    site read of it and whether it hung up."""

    def __init__(self, messages):
        self.messages, self.read, self.cancelled = list(messages), 0, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.read == len(self.messages):
            raise StopIteration
        self.read += 1
        return self.messages[self.read - 1]

    def cancel(self):
        self.cancelled = True


def _reply(state, declared=None, chunks=None):
    """The coordinator's stream for `state`: a header declaring `declared` (default: state's own
    specs), then `chunks` (default: every tensor in one chunk)."""
    specs = declared if declared is not None else [codec.spec_of(n, a) for n, a in state.items()]
    header = pb.StateChunk(header=pb.StateHeader(header=convert.header("run", 1, "s1"),
                                                  global_state_digest=codec.state_digest(specs),
                                                  tensors=[convert.spec_to_pb(s) for s in specs]))
    if chunks is None:
        chunks = [(n, 0, codec.to_bytes(a)) for n, a in state.items()]
    body = [pb.StateChunk(chunk=pb.TensorChunk(name=n, offset=o, data=d)) for n, o, d in chunks]
    return _Stream([header, *body]), codec.state_digest(specs)


def _fetch(stream, digest, initial, tmp_path):
    from participant.site_run import AgentSettings, GlobalStates, SiteCounters

    states = GlobalStates(AgentSettings("s1", "127.0.0.1:1", None, tmp_path), NoAudit(), SiteCounters())
    states.measure_from("run", _config(PLAIN), initial)
    stub = type("Stub", (), {"DownloadState": lambda self, request, timeout: stream})()
    return states.fetch(stub, "run", 1, digest, completed=0)


def test_a_state_declaring_other_tensors_than_the_models_is_refused_before_any_chunk_is_read(tmp_path):
    rng = np.random.default_rng(5)
    initial = _state(rng)
    huge = codec.TensorSpec("w_evil", "float32", (1 << 29,), b"\0" * 32, 1 << 31)   # 2 GiB, the wire's most
    cases = {
        "does not share: 'w_evil'": [*(codec.spec_of(n, a) for n, a in initial.items()), huge],
        "shared tensors missing: 'b'": [codec.spec_of("w", initial["w"])],
        "'w' declared float32[5, 6], the model's is float32[6, 5]":
            [codec.spec_of("w", initial["w"].T.copy()), codec.spec_of("b", initial["b"])],
    }
    for expected, declared in cases.items():
        stream, digest = _reply(initial, declared=declared)
        with pytest.raises(StateStepRefused, match="not this run's shared tensors") as err:
            _fetch(stream, digest, initial, tmp_path)
        assert expected in str(err.value)
        assert stream.read == 1 and stream.cancelled    # the header alone: nothing allocated for it
    stream, digest = _reply(initial)
    assert set(_fetch(stream, digest, initial, tmp_path)[1]) == {"w", "b"}   # the honest layout is taken


def test_a_malformed_state_stream_is_a_refused_state_not_a_crash(tmp_path):
    initial = _state(np.random.default_rng(6))
    raw = codec.to_bytes(initial["w"])
    stream, digest = _reply(initial, chunks=[("w", 8, raw[8:]), ("b", 0, codec.to_bytes(initial["b"]))])
    with pytest.raises(StateStepRefused, match="at offset 8, expected 0"):
        _fetch(stream, digest, initial, tmp_path)
    assert stream.cancelled
    stream, _ = _reply(initial)
    with pytest.raises(StateStepRefused, match="does not match the digest the assignment named"):
        _fetch(stream, "0" * 64, initial, tmp_path)
