"""The image-task model: determinism, parameter budgets, and moving state by role."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kt_core.factorized import FactorizedLinear
from kt_core.manifest import manifest_of
from kt_core.models import (ModelConfig, build_model, kl_divergence, load_private_state,
                            load_shared_state, private_state, shared_state)

MODES = ("waffle", "lora", "ffa_lora", "dense")
SMALL = dict(input_dim=20, hidden=(16, 8), num_classes=4, n_factors=4, lora_rank=2)



def small(adapter="waffle", **kw):
    return build_model(ModelConfig(adapter=adapter, **{**SMALL, **kw}))


@pytest.mark.parametrize("adapter", MODES)
def test_forward_shape_and_images_are_flattened(adapter):
    model = build_model(ModelConfig(adapter=adapter, hidden=(32,), n_factors=4))
    assert model(torch.rand(3, 784)).shape == (3, 10)
    assert model(torch.rand(3, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("adapter", MODES)
def test_same_seed_gives_identical_tensors_and_a_different_seed_does_not(adapter):
    a, b, c = small(adapter, seed=3), small(adapter, seed=3), small(adapter, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # frozen tensors in particular never travel: every site must rebuild them bit for bit
    for e in manifest_of(a).frozen():
        assert torch.equal(sa[e.name], sb[e.name])
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_building_does_not_depend_on_or_disturb_the_global_rng():
    torch.manual_seed(1)
    a = small()
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = small()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.set_rng_state(state)
    small()
    assert torch.equal(torch.get_rng_state(), state)


def test_waffle_has_at_least_ten_times_fewer_shared_parameters_than_dense():
    dense = build_model(ModelConfig(adapter="dense", hidden=(1024, 512)))
    waffle = build_model(ModelConfig(adapter="waffle", hidden=(1024, 512), n_factors=32))
    n_dense = manifest_of(dense).shared_numel()
    n_waffle = manifest_of(waffle).shared_numel()
    assert n_dense == 784 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 10 + 10   # ~1.33M
    assert n_dense >= 10 * n_waffle
    assert manifest_of(dense).shared_nbytes() == 4 * n_dense


@pytest.mark.parametrize("field,value", [
    ("adapter", "bogus"), ("input_dim", 0), ("hidden", (16, 0)), ("hidden", (16.0,)), ("hidden", "16"),
    ("num_classes", 1), ("n_factors", 0), ("ibp_alpha", 0.0), ("ibp_alpha", float("nan")),
    ("temperature", -1.0), ("lora_rank", 0), ("lora_alpha", float("inf")), ("seed", -1),
    ("seed", True), ("dict_lr_scale", 0.0), ("dict_lr_scale", float("nan")), ("dict_lr_scale", "4"),
])
def test_config_validation_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        build_model(ModelConfig(**{field: value}))


def test_config_round_trips_through_json():
    cfg = ModelConfig(adapter="lora", hidden=(64, 32), seed=5)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.hidden == (64, 32)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


def test_model_kl_is_the_sum_over_layers_and_zero_for_dense():
    model = small().eval()
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert len(layers) == 3
    assert torch.allclose(kl_divergence(model), sum(m.kl_divergence() for m in layers))
    assert kl_divergence(model).item() > 0
    assert kl_divergence(small("dense")).item() == 0.0


@pytest.mark.parametrize("adapter", MODES)
def test_shared_state_is_exactly_the_manifest_shared_tensors_as_detached_copies(adapter):
    model = small(adapter)
    state = shared_state(model)
    assert set(state) == manifest_of(model).shared_names()
    for t in state.values():
        assert not t.requires_grad and t.device.type == "cpu"
    name = next(iter(state))
    state[name].add_(1.0)
    assert not torch.equal(shared_state(model)[name], state[name])


@pytest.mark.parametrize("adapter", MODES)
def test_load_shared_state_round_trips_and_leaves_private_tensors_alone(adapter):
    src, dst = small(adapter, seed=1), small(adapter, seed=2)
    before_private = private_state(dst)
    load_shared_state(dst, shared_state(src))
    after = shared_state(dst)
    assert all(torch.equal(after[k], v) for k, v in shared_state(src).items())
    assert all(torch.equal(private_state(dst)[k], v) for k, v in before_private.items())


def _corrupt(state, how):
    state = dict(state)
    name = "layers.0.w_a"
    if how == "missing":
        del state[name]
    elif how == "extra":
        state["layers.0.gate_logits"] = torch.zeros(4)
    elif how == "shape":
        state[name] = torch.zeros(3, 3)
    elif how == "dtype":
        state[name] = state[name].double()
    elif how == "nonfinite":
        state[name] = state[name].clone()
        state[name][0, 0] = float("nan")
    elif how == "type":
        state[name] = state[name].numpy()
    return state


@pytest.mark.parametrize("how,tensor", [
    ("missing", "layers.0.w_a"), ("extra", "layers.0.gate_logits"), ("shape", "layers.0.w_a"),
    ("dtype", "layers.0.w_a"), ("nonfinite", "layers.0.w_a"), ("type", "layers.0.w_a"),
])
def test_load_shared_state_is_strict_and_names_the_tensor(how, tensor):
    src, dst = small(seed=1), small(seed=2)
    before = shared_state(dst)
    with pytest.raises(ValueError, match=tensor):
        load_shared_state(dst, _corrupt(shared_state(src), how))
    # nothing was half-applied
    assert all(torch.equal(shared_state(dst)[k], v) for k, v in before.items())


def test_private_state_round_trip():
    a, b = small(seed=1), small(seed=2)
    with torch.no_grad():
        for layer in a.layers:
            layer.gate_logits.uniform_(-3, 3)
    state = private_state(a)
    assert set(state) == {e.name for e in manifest_of(a).private()}
    # the variational parameters of every layer, and the output layer's bias
    output_bias = f"layers.{len(a.layers) - 1}.bias"
    assert output_bias in state
    assert all(k.rsplit(".", 1)[1] in ("gate_logits", "kuma_log_a", "kuma_log_b") or k == output_bias for k in state)
    assert output_bias not in private_state(small(seed=1, private_output_bias=False))
    load_private_state(b, state)
    assert all(torch.equal(private_state(b)[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="layers.0.w_a"):
        load_private_state(b, {**state, "layers.0.w_a": torch.zeros(4, 20)})
    assert private_state(small("dense")) == {}


def test_adapter_sizes_are_bounded_for_every_task():
    """A run config (from a coordinator the site need not trust) cannot ask for unbounded factors."""
    from kt_core.adapters import AdapterSettings
    from kt_core.models import MAX_RANK, ModelConfig

    for field in ("n_factors", "lora_rank"):
        with pytest.raises(ValueError, match=f"{field}: must be an integer between 1 and {MAX_RANK}"):
            ModelConfig(**{field: MAX_RANK + 1}).validate()
        with pytest.raises(ValueError, match=field):
            AdapterSettings(**{field: MAX_RANK + 1}).validate()


@settings(max_examples=40, deadline=None)
@given(adapter=st.sampled_from(MODES), input_dim=st.integers(1, 40),
       hidden=st.lists(st.integers(1, 24), max_size=3), classes=st.integers(2, 6), rank=st.integers(1, 6))
def test_parameter_count_is_never_below_what_the_model_allocates(adapter, input_dim, hidden, classes, rank):
    cfg = ModelConfig(adapter=adapter, input_dim=input_dim, hidden=tuple(hidden), num_classes=classes,
                      n_factors=rank, lora_rank=rank)
    allocated = sum(t.numel() for t in build_model(cfg).state_dict().values())
    assert allocated <= cfg.parameter_count() <= 1.1 * allocated + 16


@pytest.mark.parametrize("hidden, message", [
    ((100_000_000,), r"makes a model of 8\d,\d{3},\d{3},\d{3} parameters, more than 67,108,864"),
    ((8192, 8192), "more than 67,108,864"),
    ((4,) * 33, "hidden: at most 32 layers, got 33"),
])
def test_a_run_config_cannot_make_a_site_build_a_model_without_bound(hidden, message):
    # the site builds its model from the coordinator's run config: refused before anything is allocated
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(hidden=hidden))
