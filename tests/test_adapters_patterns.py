"""Adapters placed on any model by module-name patterns (kt_core.adapters)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kt_core.adapters import (AdaptedConv2d, AdapterError, AdapterSettings, adapted_layers, apply_adapters,
                              dp_problems, match_targets)
from kt_core.factorized import DenseLinear, FactorizedLinear, FFALoRALinear, LoRALinear
from kt_core.manifest import Role, manifest_of
from kt_core.models import kl_divergence, shared_state

KINDS = ("waffle", "lora", "ffa_lora", "dense")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(self.encoder(x)))


class ConvNet(nn.Module):
    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, bias=False)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.grouped(self.conv2(x)))
        return self.fc(x.flatten(1))


def _pretrained(cls, *args):
    torch.manual_seed(0)
    model = cls(*args)
    with torch.no_grad():   # a "pretrained" bias that is not zero, so copying it is tested
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.normal_()
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_linear_adapters_start_as_the_model(kind):
    base = _pretrained(MLP)
    adapted = copy.deepcopy(base)
    names = apply_adapters(adapted, kind, ["encoder.*", "head"], n_factors=4, lora_rank=2, seed=5)
    assert names == ["encoder.0", "encoder.2", "head"]
    x = torch.randn(5, 12)
    for mode in ("eval", "train"):   # WAFFLe's delta is zero at init whatever gates are drawn
        getattr(base, mode)(), getattr(adapted, mode)()
        torch.testing.assert_close(adapted(x), base(x), rtol=1e-5, atol=1e-6)
    expected = {"waffle": FactorizedLinear, "lora": LoRALinear, "ffa_lora": FFALoRALinear, "dense": DenseLinear}[kind]
    assert all(type(adapted.get_submodule(n)) is expected for n in names)


@pytest.mark.parametrize("kind", KINDS)
def test_conv_adapters_start_as_the_model(kind):
    for padding_mode in ("zeros", "reflect"):
        base = _pretrained(ConvNet, padding_mode)
        adapted = copy.deepcopy(base)
        names = apply_adapters(adapted, kind, ["conv*", "grouped", "fc"], n_factors=3, lora_rank=2)
        assert names == ["conv1", "conv2", "grouped", "fc"]
        assert isinstance(adapted.conv1, AdaptedConv2d) and isinstance(adapted.grouped, AdaptedConv2d)
        x = torch.randn(2, 3, 8, 8)
        base.eval(), adapted.eval()
        torch.testing.assert_close(adapted(x), base(x), rtol=1e-5, atol=1e-5)
        assert adapted_layers(adapted)["conv2"].startswith("conv2d/")


def test_manifest_roles_and_trainable_tensors():
    model = _pretrained(ConvNet)
    apply_adapters(model, "waffle", ["conv1", "fc"], n_factors=4)
    manifest = manifest_of(model)
    roles = {e.name: e.role for e in manifest.entries}
    # the adapted conv's tensors are a linear adapter's, of size (out, in*kh*kw)
    assert roles["conv1.adapter.w_a"] is Role.SHARED and manifest.entry("conv1.adapter.w_b").shape == (4, 27)
    assert roles["conv1.adapter.gate_logits"] is Role.PRIVATE and roles["fc.kuma_log_a"] is Role.PRIVATE
    assert roles["conv1.adapter.w0"] is Role.FROZEN and roles["fc.w0"] is Role.FROZEN
    # what was not adapted is frozen: never travels, never trains
    assert roles["conv2.weight"] is Role.FROZEN and roles["grouped.bias"] is Role.FROZEN
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, r in roles.items() if r is not Role.FROZEN}
    assert set(shared_state(model)) == {n for n, r in roles.items() if r is Role.SHARED}
    assert float(kl_divergence(model).detach()) > 0   # the conv's adapter contributes its KL term


def test_ffa_lora_shares_only_b_and_bias():
    model = _pretrained(MLP)
    apply_adapters(model, "ffa-lora", ["head"], lora_rank=2)
    shared = {e.name for e in manifest_of(model).shared()}
    assert shared == {"head.lora_b", "head.bias"}


def test_training_moves_only_the_adapters():
    model = _pretrained(ConvNet)
    frozen_before = copy.deepcopy(model.conv2.state_dict())
    apply_adapters(model, "lora", ["conv1", "fc"], lora_rank=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert model.conv1.adapter.lora_b.abs().sum() > 0
    for k, v in model.conv2.state_dict().items():
        torch.testing.assert_close(v, frozen_before[k])


def test_same_seed_same_adapters_everywhere():
    a, b = _pretrained(MLP), _pretrained(MLP)
    apply_adapters(a, "ffa_lora", ["*"], seed=7)
    apply_adapters(b, "ffa_lora", ["*"], seed=7)
    assert manifest_of(a).digest() == manifest_of(b).digest()
    torch.testing.assert_close(a.head.lora_a, b.head.lora_a)


def test_patterns_suffix_glob_regex():
    model = MLP()
    assert match_targets(model, ["head"]) == ["head"]
    assert match_targets(model, ["0"]) == ["encoder.0"]             # the name's tail, as PEFT
    assert match_targets(model, ["re:encoder\\.[02]"]) == ["encoder.0", "encoder.2"]
    # a wildcard over norms and activations adapts the linear layers and leaves the rest frozen
    assert match_targets(model, ["*"]) == ["encoder.0", "encoder.2", "head"]


def test_a_pattern_that_matches_nothing_names_it_and_the_layers():
    with pytest.raises(AdapterError) as err:
        apply_adapters(MLP(), "lora", ["head", "decoder.*"])
    assert "'decoder.*'" in str(err.value) and "encoder.0" in str(err.value)


def test_a_layer_that_cannot_be_adapted_is_named_with_its_type():
    with pytest.raises(AdapterError, match=r"'norm' of type LayerNorm"):
        apply_adapters(MLP(), "lora", ["norm"])

    class Embedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(10, 4)

    with pytest.raises(AdapterError, match=r"only modules that cannot be adapted: 'tokens \(Embedding\)'"):
        apply_adapters(Embedder(), "lora", ["tok*"])


def test_bad_kind_size_and_regex():
    with pytest.raises(AdapterError, match="adapter kind 'qlora'"):
        apply_adapters(MLP(), "qlora", ["head"])
    with pytest.raises(AdapterError, match="unknown adapter size"):
        apply_adapters(MLP(), "lora", ["head"], rank=4)
    with pytest.raises(AdapterError, match="not a valid regular expression"):
        apply_adapters(MLP(), "lora", ["re:("])
    with pytest.raises(AdapterError, match="adapter lora: rank must be >= 1"):
        apply_adapters(MLP(), "lora", ["head"], lora_rank=0)


def test_adapting_twice_is_refused():
    model = MLP()
    apply_adapters(model, "lora", ["head"])
    with pytest.raises(AdapterError, match="already carry adapters"):
        apply_adapters(model, "lora", ["head"])


def test_dp_compatibility_is_checked_up_front():
    mlp = MLP()
    apply_adapters(mlp, "waffle", ["encoder.*"])
    assert dp_problems(mlp, "hooks") == []
    assert any("use 'hooks'" in str(p) for p in dp_problems(mlp, "ew"))
    conv = ConvNet()
    apply_adapters(conv, "lora", ["conv1", "grouped", "fc"])
    assert [p.module for p in dp_problems(conv)] == ["grouped"]   # an ungrouped conv has its rule

    class WithBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

    bn = WithBatchNorm()
    apply_adapters(bn, "lora", ["fc"])
    assert any("BatchNorm" in str(p) for p in dp_problems(bn))


@pytest.mark.parametrize("kind", ["lora", "dense", "waffle"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_dp_sgd_per_sample_gradients_of_an_adapted_conv_equal_autograd(kind, padding_mode):
    """Under DP-SGD an ungrouped adapted Conv2d gets its per-sample gradients from the linear
    adapter's rule (it runs over unfolded patches): each equals plain autograd on that one record."""
    from opacus.grad_sample import GradSampleModule

    import participant.privacy  # noqa: F401  (registers the adapters' per-sample gradient rules, as a site does)
    from security.dp import grad_samplers

    model = _pretrained(ConvNet, padding_mode)
    apply_adapters(model, kind, ["conv1", "conv2"], n_factors=3, lora_rank=2, seed=1)
    with torch.no_grad():   # away from the zero-delta start, so every factor's gradient is nonzero
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    for name, p in model.named_parameters():
        if "kuma" in name:   # only in the KL term, kept out of the hooks as train_dp does
            p.requires_grad_(False)
    x = torch.randn(4, 3, 7, 7)
    undo = grad_samplers.instrument(model)
    gsm = GradSampleModule(model, strict=False, loss_reduction="sum")
    model.train()
    model(x).pow(2).sum().backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None}
    drawn = {m: m._dp_gates[0] for m in model.modules() if hasattr(m, "_dp_gates")}
    gsm._close()
    undo()
    for m, g in drawn.items():   # WAFFLe: the per-record passes reuse the gates the batch drew
        m.gates = lambda g=g: g
    adapted = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith(("conv1.", "conv2."))}
    assert adapted and adapted <= set(got)
    for i in range(4):
        model.zero_grad()
        model(x[i:i + 1]).pow(2).sum().backward()
        for name in adapted - {"conv1.adapter.gate_logits", "conv2.adapter.gate_logits"}:
            torch.testing.assert_close(got[name][i], dict(model.named_parameters())[name].grad,
                                       rtol=1e-4, atol=1e-5, msg=f"{kind} {name}")


def test_adapter_settings_validate():
    assert AdapterSettings(adapter="ffa-lora").adapter == "ffa_lora"
    with pytest.raises(ValueError, match="adapter: 'qlora'"):
        AdapterSettings(adapter="qlora").validate()
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        AdapterSettings(targets=("a", "re:(")).validate()
    with pytest.raises(ValueError, match="lora_rank"):
        AdapterSettings(lora_rank=0).validate()
