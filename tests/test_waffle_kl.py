"""The WAFFLe layer's closed-form KL (kt_core.factorized_kl) against the autograd reference."""
import pytest
import torch

from kt_core.factorized import FactorizedLinear


def _layer(seed: int, alpha: float, scale: float) -> FactorizedLinear:
    layer = FactorizedLinear(5, 4, n_factors=12, ibp_alpha=alpha, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.gate_logits.copy_(torch.randn(12, generator=gen) * scale)
        layer.kuma_log_a.copy_(torch.randn(12, generator=gen))
        layer.kuma_log_b.copy_(torch.randn(12, generator=gen))
    return layer


def _kl_and_grads(layer, fn):
    layer.zero_grad()
    torch.manual_seed(7)      # the same stick-breaking noise for both
    kl = fn()
    kl.backward()
    return kl.item(), [getattr(layer, n).grad.clone() for n in ("gate_logits", "kuma_log_a", "kuma_log_b")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("seed,alpha,scale", [(0, 0.7, 3.0), (1, 4.0, 1.0), (2, 8.0, 6.0), (3, 1.5, 0.1)])
def test_closed_form_kl_matches_the_autograd_reference_in_value_and_gradient(training, seed, alpha, scale):
    layer = _layer(seed, alpha, scale).train(training)
    fast, fast_grads = _kl_and_grads(layer, layer.kl_divergence)
    ref, ref_grads = _kl_and_grads(layer, layer.kl_divergence_reference)
    assert fast == pytest.approx(ref, rel=1e-5)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)



def _gates_composition(layer, u):
    """FactorizedLinear.gates as it was written before it became one node (the natural-gradient
    logits, the binary Concrete, the straight-through bracket)."""
    soft = torch.sigmoid((layer._natural_logits() + torch.log(u) - torch.log1p(-u)) / layer.temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())


@pytest.mark.parametrize("seed,scale", [(0, 0.5), (1, 3.0), (2, 8.0)])
def test_gate_node_matches_the_composition_in_value_and_gradient(seed, scale):
    layer = _layer(seed, 4.0, scale).train()
    weights = torch.randn(12, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    fast = layer.gates()
    (fast_grad,) = torch.autograd.grad((fast * weights).sum(), layer.gate_logits)
    torch.manual_seed(seed)   # the same noise: gates() draws u first
    u = torch.rand_like(layer.gate_logits).clamp(layer._EPS, 1 - layer._EPS)
    ref = _gates_composition(layer, u)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), layer.gate_logits)
    assert torch.equal(fast, ref) and set(fast.tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-6, atol=0)
    assert fast_grad.abs().sum() > 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_models_layers_share_one_kl_node_per_kind_and_equal_the_sum_of_the_references(training):
    from kt_core.factorized import LoRALinear
    from kt_core.models import kl_divergence, kl_terms

    layers = [_layer(0, 4.0, 2.0), LoRALinear(5, 4), _layer(1, 4.0, 1.0),
              FactorizedLinear(4, 3, n_factors=7, ibp_alpha=2.0, seed=5), _layer(2, 4.0, 4.0)]
    model = torch.nn.Sequential(*layers).train(training)
    params = [p for m in layers if isinstance(m, FactorizedLinear)
              for p in (m.gate_logits, m.kuma_log_a, m.kuma_log_b)]
    assert len(kl_terms(model)) == 2     # K = 12, alpha 4 (three layers) and K = 7, alpha 2; LoRA has none
    torch.manual_seed(3)
    fast = kl_divergence(model)
    fast_grads = torch.autograd.grad(fast, params)
    torch.manual_seed(3)      # the references draw their noise in module order too
    ref = sum(m.kl_divergence_reference() for m in layers if isinstance(m, FactorizedLinear))
    ref_grads = torch.autograd.grad(ref, params)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stacked_layers_give_the_sum_of_the_references(training):
    from kt_core.factorized_kl import stacked_kl

    layers = [_layer(s, 4.0, 3.0).train(training) for s in (4, 5)]
    params = [p for m in layers for p in (m.gate_logits, m.kuma_log_a, m.kuma_log_b)]
    torch.manual_seed(11)
    ref = sum(m.kl_divergence_reference() for m in layers)
    ref_grads = torch.autograd.grad(ref, params)
    torch.manual_seed(11)
    u = (torch.stack([torch.rand(12, dtype=torch.float64).clamp(m._EPS, 1 - m._EPS) for m in layers])
         if training else None)
    kl = stacked_kl([m.gate_logits for m in layers], [m.kuma_log_a for m in layers],
                    [m.kuma_log_b for m in layers], u, 4.0, layers[0].FISHER_FLOOR, layers[0]._PI_MIN, layers[0]._EPS)
    assert kl.dtype == torch.float32 and kl.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(kl, params), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one or more layers"):
        stacked_kl([], [], [], None, 4.0, 0.05, 1e-6, 1e-6)
