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

