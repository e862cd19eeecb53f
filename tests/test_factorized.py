"""The factorized adapters' math, their roles, and the factor manifest."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kt_core.factorized import (ADAPTERS, DenseLinear, FactorizedLinear, FFALoRALinear, LoRALinear,
                                bernoulli_kl, kumaraswamy_beta_kl)
from kt_core.manifest import FactorManifest, ManifestError, Role, TensorEntry, manifest_of
from kt_core.models import load_shared_state, shared_state

from bench.waffle_sim import fedavg_mean

FAST = settings(max_examples=30, deadline=None)
dims = st.integers(1, 12)



def _randomize(layer: nn.Module, seed: int) -> None:
    """Give every parameter a random value, so no test passes thanks to a zero init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# reconstruction of the effective weight
# ---------------------------------------------------------------------------------------------

@FAST
@given(d_in=dims, d_out=dims, k=st.integers(1, 8), with_base=st.booleans(), seed=st.integers(0, 2**16))
def test_waffle_effective_weight_and_output_match_hand_computation(d_in, d_out, k, with_base, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=gen) if with_base else None
    layer = FactorizedLinear(d_in, d_out, n_factors=k, base=base, seed=seed)
    _randomize(layer, seed)
    layer.eval()
    # eval: the posterior mode of q(b), keeping the most probable factor when none is > 0
    b = (layer.gate_logits > 0).float()
    if b.sum() == 0:
        b = F.one_hot(layer.gate_logits.argmax(), k).float()
    if with_base:
        assert torch.equal(layer.w0, base)
    w_by_hand = layer.w0 + layer.w_a @ torch.diag(layer.r * b) @ layer.w_b
    x = torch.randn(5, d_in, generator=gen)
    with torch.no_grad():
        assert torch.allclose(layer.effective_weight(), w_by_hand, atol=1e-5)
        assert torch.allclose(layer(x), x @ w_by_hand.T + layer.bias, atol=1e-4)


def test_waffle_training_gates_are_hard_and_carry_a_gradient():
    layer = FactorizedLinear(6, 4, n_factors=32, seed=1)
    with torch.no_grad():
        layer.gate_logits.copy_(torch.linspace(-3, 3, 32))
    layer.train()
    torch.manual_seed(0)
    b = layer.gates()
    assert set(b.detach().unique().tolist()) <= {0.0, 1.0}
    assert 0 < b.sum() < 32
    b.sum().backward()
    assert layer.gate_logits.grad.abs().sum() > 0


def test_waffle_eval_is_deterministic_and_train_matches_eval_when_gates_are_certain():
    layer = FactorizedLinear(8, 3, n_factors=6, seed=2)
    with torch.no_grad():
        layer.gate_logits.copy_(torch.tensor([40.0, -40.0, 40.0, 40.0, -40.0, 40.0]))
    x = torch.randn(4, 8)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))
    layer.train()
    assert torch.allclose(layer(x), y_eval, atol=1e-6)


def test_waffle_eval_mode_never_switches_a_whole_layer_off():
    # every logit < 0 would leave the layer its bias alone: the most probable factor stays on
    layer = FactorizedLinear(8, 3, n_factors=6, seed=2).eval()
    with torch.no_grad():
        layer.gate_logits.copy_(torch.tensor([-3.0, -0.5, -2.0, -4.0, -1.0, -6.0]))
    assert layer.mode_gates().tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    x = torch.randn(5, 8)
    assert not torch.allclose(layer(x), layer.bias.expand(5, 3))
    with torch.no_grad():
        layer.gate_logits.copy_(torch.tensor([2.0, -0.5, 1.0, -4.0, -1.0, -6.0]))
    assert layer.mode_gates().tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_waffle_without_a_base_starts_as_the_dense_layer_of_its_seed():
    # the seeded frozen base is He-normal and the update starts at zero: WAFFLe and the dense
    # baseline start from the same function, and every site draws the same base from the seed
    layer = FactorizedLinear(400, 300, n_factors=5, seed=0).eval()
    assert layer.seeded_base and not layer.w0.requires_grad
    assert torch.equal(layer.effective_weight(), DenseLinear(400, 300, seed=0).weight)
    assert layer.w0.var().item() == pytest.approx(2 / 400, rel=0.15)
    assert torch.equal(FactorizedLinear(400, 300, n_factors=5, seed=0).w0, layer.w0)
    assert not torch.equal(FactorizedLinear(400, 300, n_factors=5, seed=1).w0, layer.w0)


@pytest.mark.parametrize("cls", [LoRALinear, FFALoRALinear])
@pytest.mark.parametrize("with_base", [False, True])
def test_lora_effective_weight_and_output(cls, with_base):
    base = torch.randn(5, 7) if with_base else None
    layer = cls(7, 5, rank=3, alpha=6.0, base=base, seed=3)
    _randomize(layer, 3)
    if with_base:
        assert torch.equal(layer.w0, base)
    w = layer.w0 + 2.0 * layer.lora_b @ layer.lora_a       # alpha / rank = 2
    x = torch.randn(4, 7)
    with torch.no_grad():
        assert torch.allclose(layer.effective_weight(), w, atol=1e-5)
        assert torch.allclose(layer(x), x @ w.T + layer.bias, atol=1e-5)


def test_lora_family_starts_at_the_base_and_frozen_tensors_come_from_the_seed():
    base = torch.randn(5, 7)
    for cls in (LoRALinear, FFALoRALinear):
        layer = cls(7, 5, base=base, seed=4)
        assert torch.equal(layer.effective_weight(), base)     # B = 0: no delta yet
        again, other = cls(7, 5, seed=4), cls(7, 5, seed=5)
        assert torch.equal(again.lora_a, cls(7, 5, seed=4).lora_a)
        assert torch.equal(again.w0, cls(7, 5, seed=4).w0)
        assert not torch.equal(again.w0, other.w0)
    # a pretrained base must not be perturbed by the factor init either
    waffle = FactorizedLinear(7, 5, base=base, seed=4)
    waffle.eval()
    assert torch.equal(waffle.effective_weight(), base)


def test_dense_is_a_linear_layer():
    layer = DenseLinear(6, 3, seed=0)
    x = torch.randn(2, 6)
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer.kl_divergence().item() == 0.0


def test_base_with_wrong_shape_is_refused():
    for cls in ADAPTERS.values():
        with pytest.raises(ValueError, match="base weight has shape"):
            cls(4, 3, base=torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------------
# KL terms
# ---------------------------------------------------------------------------------------------

positive = st.floats(0.05, 30.0)


@FAST
@given(a=st.lists(positive, min_size=1, max_size=8), b=st.lists(positive, min_size=1, max_size=8),
       alpha=positive)
def test_kumaraswamy_beta_kl_is_non_negative(a, b, alpha):
    n = min(len(a), len(b))
    kl = kumaraswamy_beta_kl(torch.tensor(a[:n]), torch.tensor(b[:n]), alpha)
    assert torch.isfinite(kl).all() and (kl >= 0).all()


@FAST
@given(alpha=positive)
def test_kumaraswamy_beta_kl_vanishes_at_the_prior(alpha):
    # Kumaraswamy(alpha, 1) has density alpha x^(alpha-1): it is Beta(alpha, 1)
    kl = kumaraswamy_beta_kl(torch.tensor([alpha]), torch.tensor([1.0]), alpha)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("a,b,alpha", [(2.0, 3.0, 4.0), (0.7, 1.5, 2.0), (5.0, 0.8, 1.0)])
def test_kumaraswamy_beta_kl_matches_a_monte_carlo_estimate(a, b, alpha):
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(400_000, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    v = (1 - u ** (1 / b)) ** (1 / a)
    v = v.clamp(1e-12, 1 - 1e-12)
    log_q = math.log(a * b) + (a - 1) * torch.log(v) + (b - 1) * torch.log1p(-v ** a)
    log_p = math.log(alpha) + (alpha - 1) * torch.log(v)                   # Beta(alpha, 1)
    mc = (log_q - log_p).mean().item()
    closed = kumaraswamy_beta_kl(torch.tensor(a), torch.tensor(b), alpha).item()
    assert closed == pytest.approx(mc, abs=0.02)


@FAST
@given(logits=st.lists(st.floats(-30, 30), min_size=1, max_size=8),
       prior=st.lists(st.floats(1e-6, 1 - 1e-6), min_size=1, max_size=8))
def test_bernoulli_kl_is_non_negative(logits, prior):
    n = min(len(logits), len(prior))
    kl = bernoulli_kl(torch.tensor(logits[:n]), torch.tensor(prior[:n], dtype=torch.float64).log())
    assert torch.isfinite(kl).all() and (kl >= 0).all()


@FAST
@given(p=st.floats(1e-4, 1 - 1e-4))
def test_bernoulli_kl_vanishes_at_matching_probabilities(p):
    logit = torch.tensor([math.log(p) - math.log1p(-p)], dtype=torch.float64)
    kl = bernoulli_kl(logit, torch.tensor([math.log(p)], dtype=torch.float64))
    assert kl.item() == pytest.approx(0.0, abs=1e-9)


@FAST
@given(seed=st.integers(0, 2**16), training=st.booleans(), alpha=st.floats(0.5, 10.0))
def test_layer_kl_is_non_negative_for_random_posteriors(seed, training, alpha):
    layer = FactorizedLinear(5, 4, n_factors=8, ibp_alpha=alpha, seed=seed)
    _randomize(layer, seed)
    layer.train(training)
    torch.manual_seed(seed)
    kl = layer.kl_divergence()
    assert kl.dtype == torch.float32 and torch.isfinite(kl) and kl.item() >= 0


def test_layer_kl_grows_with_gates_the_prior_switches_off():
    # pi_k shrinks with k under the IBP: a late factor switched on costs more than an early one
    layer = FactorizedLinear(5, 4, n_factors=12, seed=0).eval()
    with torch.no_grad():
        layer.gate_logits.fill_(-5.0)
        layer.gate_logits[0] = 5.0
        early = layer.kl_divergence().item()
        layer.gate_logits[0] = -5.0
        layer.gate_logits[-1] = 5.0
        late = layer.kl_divergence().item()
    assert late > early


def test_gradients_reach_shared_and_private_factors():
    torch.manual_seed(0)
    layer = FactorizedLinear(10, 4, n_factors=6, seed=0)
    layer.train()
    x, y = torch.randn(32, 10), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    names = ("w_a", "w_b", "r", "bias", "gate_logits", "kuma_log_a", "kuma_log_b")

    def grads():
        opt.zero_grad()
        (F.cross_entropy(layer(x), y) + layer.kl_divergence() / 32).backward()
        return {name: getattr(layer, name).grad for name in names}

    # w_a starts at zero (the layer starts as its base), so on the first step only w_a (and the
    # bias and the KL's parameters) get a gradient: w_b, r and the gates' data term go through w_a
    first = grads()
    assert first["w_b"].abs().sum() == 0 and first["r"].abs().sum() == 0
    assert first["w_a"].abs().sum() > 0
    opt.step()
    for name, grad in grads().items():
        assert grad is not None and grad.abs().sum() > 0, name


def test_non_bayesian_adapters_have_zero_kl():
    for mode in ("lora", "ffa_lora", "dense"):
        assert ADAPTERS[mode](4, 3).kl_divergence().item() == 0.0


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------

@FAST
@given(n_sites=st.integers(1, 5), seed=st.integers(0, 2**16),
       weights=st.lists(st.integers(1, 1000), min_size=5, max_size=5))
def test_fedavg_of_shared_states_is_the_weighted_mean(n_sites, seed, weights):
    gen = torch.Generator().manual_seed(seed)
    states = [{"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)} for _ in range(n_sites)]
    out = fedavg_mean(states, weights[:n_sites])
    total = sum(weights[:n_sites])
    for name in ("a", "b"):
        expected = sum(s[name].double() * w for s, w in zip(states, weights)) / total
        assert out[name].dtype == torch.float32
        assert torch.allclose(out[name].double(), expected, atol=1e-5)


def _site_layers(cls, n_sites, seed):
    layers = []
    for i in range(n_sites):
        layer = cls(6, 5, rank=2, seed=0)       # same seed: same frozen A and W0 at every site
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            layer.lora_b.copy_(torch.randn(5, 2, generator=gen))
            if cls is LoRALinear:
                layer.lora_a.copy_(torch.randn(2, 6, generator=gen))
        layers.append(layer)
    return layers


def _aggregate_into(layers, weights, cls):
    wrapped = [nn.Sequential(layer) for layer in layers]
    # the coordinator's own FedAvg (bench.waffle_sim.fedavg_mean drives coordinator.strategy.FedAvg)
    mean = fedavg_mean([shared_state(m) for m in wrapped], weights)
    target = nn.Sequential(cls(6, 5, rank=2, seed=0))
    load_shared_state(target, mean)
    return target[0]


@FAST
@given(n_sites=st.integers(2, 5), seed=st.integers(0, 2**16),
       weights=st.lists(st.integers(1, 100), min_size=5, max_size=5))
def test_ffa_lora_aggregation_is_exact(n_sites, seed, weights):
    layers = _site_layers(FFALoRALinear, n_sites, seed)
    w = weights[:n_sites]
    merged = _aggregate_into(layers, w, FFALoRALinear)
    mean_delta = sum(layer.delta() * wi for layer, wi in zip(layers, w)) / sum(w)
    assert torch.allclose(merged.delta(), mean_delta, atol=1e-5)


def test_lora_aggregation_is_not_exact_in_general():
    layers = _site_layers(LoRALinear, 3, seed=7)
    merged = _aggregate_into(layers, [1, 1, 1], LoRALinear)
    mean_delta = sum(layer.delta() for layer in layers) / 3
    assert (merged.delta() - mean_delta).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# roles and the manifest
# ---------------------------------------------------------------------------------------------

def _roles(model):
    return {e.name: e.role for e in manifest_of(model).entries}


def test_manifest_of_waffle():
    S, P, F_ = Role.SHARED, Role.PRIVATE, Role.FROZEN
    no_base = nn.Sequential(FactorizedLinear(4, 3, n_factors=2))
    assert _roles(no_base) == {"0.w_a": S, "0.w_b": S, "0.r": S, "0.bias": S,
                               "0.gate_logits": P, "0.kuma_log_a": P, "0.kuma_log_b": P,
                               "0.w0": F_}   # the seeded base: drawn at every site, never sent
    with_base = nn.Sequential(FactorizedLinear(4, 3, n_factors=2, base=torch.zeros(3, 4)))
    assert _roles(with_base)["0.w0"] is F_
    assert len(_roles(with_base)) == 8


def test_manifest_of_lora_ffa_and_dense():
    S, F_ = Role.SHARED, Role.FROZEN
    assert _roles(nn.Sequential(LoRALinear(4, 3))) == {
        "0.lora_a": S, "0.lora_b": S, "0.bias": S, "0.w0": F_}
    assert _roles(nn.Sequential(FFALoRALinear(4, 3))) == {
        "0.lora_a": F_, "0.lora_b": S, "0.bias": S, "0.w0": F_}
    assert _roles(nn.Sequential(DenseLinear(4, 3))) == {"0.weight": S, "0.bias": S}
    # FFA-LoRA's frozen A is not a parameter at all, so no optimizer can move it
    assert "lora_a" not in dict(FFALoRALinear(4, 3).named_parameters())


def test_manifest_of_plain_modules_falls_back_to_dense_fedavg():
    frozen = nn.Linear(3, 3)
    frozen.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), frozen)
    roles = _roles(model)
    assert roles["0.weight"] is Role.SHARED and roles["0.bias"] is Role.SHARED
    assert roles["1.weight"] is Role.SHARED
    assert roles["1.running_mean"] is Role.PRIVATE        # learnt from local data: stays local
    assert roles["2.weight"] is Role.FROZEN and roles["2.bias"] is Role.SHARED
    # every tensor of the state dict has exactly one role
    assert set(roles) == set(model.state_dict())


def test_manifest_of_excludes_non_persistent_buffers():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].register_buffer("scratch", torch.zeros(2), persistent=False)
    assert "0.scratch" not in _roles(model)


def test_manifest_of_refuses_incomplete_or_wrong_role_declarations():
    class Missing(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))
            self.v = nn.Parameter(torch.zeros(2))

        def tensor_roles(self):
            return {"w": Role.SHARED}

    class Extra(Missing):
        def tensor_roles(self):
            return {"w": Role.SHARED, "v": Role.SHARED, "ghost": Role.PRIVATE}

    with pytest.raises(ManifestError, match="'v'"):
        manifest_of(Missing())
    with pytest.raises(ManifestError, match="ghost"):
        manifest_of(Extra())


def test_manifest_queries():
    m = manifest_of(nn.Sequential(FactorizedLinear(4, 3, n_factors=2, base=torch.zeros(3, 4))))
    assert [e.name for e in m.entries] == sorted(e.name for e in m.entries)
    assert m.role_of("0.gate_logits") is Role.PRIVATE
    with pytest.raises(KeyError, match="not in the factor manifest"):
        m.role_of("0.nope")
    assert m.shared_names() == {"0.w_a", "0.w_b", "0.r", "0.bias"}
    assert {e.name for e in m.private()} == {"0.gate_logits", "0.kuma_log_a", "0.kuma_log_b"}
    assert {e.name for e in m.frozen()} == {"0.w0"}
    assert m.shared_numel() == 3 * 2 + 2 * 4 + 2 + 3
    assert m.shared_nbytes() == 4 * m.shared_numel()


entry_st = st.builds(
    TensorEntry,
    name=st.text("abcdefgh._0123", min_size=1, max_size=12),
    role=st.sampled_from(list(Role)),
    shape=st.lists(st.integers(0, 50), max_size=4).map(tuple),
    dtype=st.sampled_from(["float32", "float16", "int64", "bool", "bfloat16"]),
)


@FAST
@given(st.lists(entry_st, max_size=8, unique_by=lambda e: e.name))
def test_manifest_json_round_trip(entries):
    m = FactorManifest(tuple(entries))
    back = FactorManifest.from_json(m.to_json())
    assert back == m
    assert back.digest() == m.digest()


def test_manifest_digest_is_order_independent_and_sensitive():
    a = TensorEntry("a", Role.SHARED, (2,), "float32")
    b = TensorEntry("b", Role.PRIVATE, (3,), "float32")
    assert FactorManifest((a, b)).digest() == FactorManifest((b, a)).digest()
    b2 = TensorEntry("b", Role.SHARED, (3,), "float32")
    assert FactorManifest((a, b)).digest() != FactorManifest((a, b2)).digest()


def test_manifest_of_a_model_round_trips():
    m = manifest_of(nn.Sequential(FactorizedLinear(4, 3, n_factors=2), LoRALinear(3, 2)))
    assert FactorManifest.from_json(m.to_json()) == m


GOOD_ENTRY = {"name": "w", "role": "shared", "shape": [2, 3], "dtype": "float32"}


def _doc(*entries, **top):
    return json.dumps({"version": 1, "entries": list(entries), **top})


@pytest.mark.parametrize("text,field", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level"),
    (json.dumps({"entries": []}), "expected keys"),
    (json.dumps({"version": 2, "entries": []}), "version"),
    (json.dumps({"version": 1, "entries": {}}), "entries: must be a list"),
    (_doc("w"), r"entries\[0\]: must be an object"),
    (_doc({**GOOD_ENTRY, "extra": 1}), r"entries\[0\]: expected keys"),
    (_doc({k: v for k, v in GOOD_ENTRY.items() if k != "dtype"}), r"entries\[0\]: expected keys"),
    (_doc({**GOOD_ENTRY, "name": ""}), r"entries\[0\]\.name"),
    (_doc({**GOOD_ENTRY, "name": 5}), r"entries\[0\]\.name"),
    (_doc({**GOOD_ENTRY, "role": "public"}), r"entries\[0\]\.role"),
    (_doc({**GOOD_ENTRY, "shape": [2, -1]}), r"entries\[0\]\.shape"),
    (_doc({**GOOD_ENTRY, "shape": [2.0]}), r"entries\[0\]\.shape"),
    (_doc({**GOOD_ENTRY, "shape": [True]}), r"entries\[0\]\.shape"),
    (_doc({**GOOD_ENTRY, "shape": 3}), r"entries\[0\]\.shape"),
    (_doc({**GOOD_ENTRY, "dtype": "float128"}), r"entries\[0\]\.dtype"),
    (_doc(GOOD_ENTRY, {**GOOD_ENTRY, "role": "private"}), "duplicate tensor name 'w'"),
])
def test_malformed_manifest_is_rejected_naming_the_field(text, field):
    with pytest.raises(ManifestError, match=field):
        FactorManifest.from_json(text)
    assert issubclass(ManifestError, ValueError)
