"""The leakage measurements' building blocks: metrics, the one-run bound, the attacks."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from kt_core.leakage import metrics, one_run
from kt_core.leakage.inversion import analytic_candidates, cross_entropy_grads, invert_gradients
from kt_core.leakage.scenario import (CONDITIONS, attacker_forward, build, local_update, make_splits, shared_names,
                                     warm_up)
from kt_core.leakage.suite import SuiteSettings, canary_round
from ktfed.audit_cmd import accountant

torch.set_num_threads(1)
BASELINE, DP = CONDITIONS[0], CONDITIONS[3]


# ---------------------------------------------------------------- metrics

def test_psnr_and_ssim_behave():
    rng = np.random.default_rng(0)
    img = rng.random((8, 8))
    assert metrics.psnr(img, img) == metrics.PSNR_CAP and metrics.ssim(img, img) == pytest.approx(1.0)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 1) for s in (0.05, 0.2, 0.5)]
    psnrs = [metrics.psnr(n, img) for n in noisy]
    ssims = [metrics.ssim(n, img) for n in noisy]
    assert psnrs == sorted(psnrs, reverse=True) and ssims == sorted(ssims, reverse=True)
    assert metrics.ssim(noisy[1], img) == pytest.approx(metrics.ssim(img, noisy[1]))
    assert metrics.psnr(np.zeros(64), np.full(64, 0.1)) == pytest.approx(20.0)


def test_auc_matches_scikit_learn_and_tpr_uses_the_non_member_threshold():
    rng = np.random.default_rng(1)
    m, n = np.round(rng.normal(0.5, 1, 300), 1), np.round(rng.normal(0, 1, 500), 1)   # with ties
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(500)], np.r_[m, n])
    assert metrics.roc_auc(m, n) == pytest.approx(expected)
    # 1% of 200 non-members = 2 may score above the threshold, the 3rd highest is the threshold
    outs = np.arange(200.0)
    assert metrics.tpr_at_fpr([197.5, 196.5, 198.5, 0.0], outs) == pytest.approx(0.5)


# ---------------------------------------------------------------- the one-run bound

def test_one_run_bound_reproduces_the_paper_and_is_monotone():
    # Steinke et al.: 1000 canaries, 100 guesses all correct -> about 3.5 at 95%
    assert one_run.epsilon_lower_bound(1000, 100, 100) == pytest.approx(3.49, abs=0.01)
    assert one_run.epsilon_lower_bound(1000, 100, 100, delta=1e-5) < one_run.epsilon_lower_bound(1000, 100, 100)
    assert one_run.epsilon_lower_bound(1000, 100, 50) == 0.0
    assert [one_run.p_value(1000, 100, 80, e) for e in (0.5, 1, 2)] == sorted(
        one_run.p_value(1000, 100, 80, e) for e in (0.5, 1, 2))


def test_one_run_bound_holds_for_a_mechanism_that_is_exactly_eps_dp():
    """Randomized response on each canary is exactly eps-DP: the 95% lower bound may exceed eps in
    at most about 5% of runs (here: with fixed seeds, at most 8 of 100)."""
    eps, m = 1.0, 400
    rng = np.random.default_rng(2)
    above = 0
    for _ in range(100):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        scores = np.where(truthful == included, 1.0, 0.0) + rng.random(m) * 1e-3
        above += one_run.audit(scores, included).epsilon_lower_bound > eps
    assert above <= 8


# ---------------------------------------------------------------- attacks on a single image

@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    splits = make_splits(0, 3, 16, 200)
    return splits, build("dense", 0), build("factorized", 0)


def test_analytic_inversion_of_a_dense_layer_is_exact(setting):
    splits, dense, _ = setting
    x, y = splits.sites[0][0][:1], splits.sites[0][1][:1]
    update = local_update(dense, (x, y), BASELINE, 0.1, torch.Generator().manual_seed(0))
    assert metrics.best_match(x.numpy(), analytic_candidates(update, "layers.0", False))["psnr"] > 60


def test_a_factorized_update_of_one_image_still_gives_it_away(setting):
    """The documented limit: with a batch of one, each row of the shared dW_b is that image times a
    number, so rescaling recovers it. Factorization hides mixtures of images, not a single one."""
    splits, _, factorized = setting
    # a global model a few rounds in, as the leakage suite attacks: at init w_a = 0 (the layer is
    # its seeded base), so dW_b is zero and gives nothing away, which is no protection once w_a moved
    factorized = warm_up(copy.deepcopy(factorized), splits.public, 1, 0.1, 0)
    x, y = splits.sites[0][0][:1], splits.sites[0][1][:1]
    cond = CONDITIONS[2]
    update = local_update(factorized, (x, y), cond, 0.1, torch.Generator().manual_seed(0))
    assert set(update) == set(shared_names(factorized)) and not any("gate" in n for n in update)
    assert metrics.best_match(x.numpy(), analytic_candidates(update, "layers.0", True))["psnr"] > 25


def test_gradient_inversion_recovers_an_image_from_a_dense_update(setting):
    splits, dense, _ = setting
    x, y = splits.sites[0][0][:1], splits.sites[0][1][:1]
    update = local_update(dense, (x, y), BASELINE, 0.1, torch.Generator().manual_seed(0))
    names = shared_names(dense)
    params = dict(dense.named_parameters())
    grad_fn = cross_entropy_grads(attacker_forward(dense, {}), {n: params[n] for n in names}, y)
    recon = invert_gradients(grad_fn, [-update[n] for n in names], 1, 64, iterations=200)
    assert metrics.best_match(x.numpy(), recon)["psnr"] > 25


# ---------------------------------------------------------------- canaries vs the accountant

@pytest.mark.parametrize("sigma,epochs", [(0.5, 1), (1.0, 1), (1.0, 3), (2.0, 2)])
def test_one_run_lower_bound_never_exceeds_the_accountants_epsilon(setting, sigma, epochs):
    splits, dense, _ = setting
    cond = dataclasses.replace(DP, noise_multiplier=sigma, epochs=epochs)
    row = canary_round(cond, dense, splits, SuiteSettings(canaries=1000), torch.Generator().manual_seed(3),
                       aggregate=None, accountant=accountant)
    assert 0 <= row["epsilon_lower_bound"] <= row["epsilon_accountant"], row
    assert row["canaries"] == 1000 and row["delta"] == 1e-5


def test_a_mechanism_that_adds_less_noise_than_it_claims_is_caught(setting):
    """The check has teeth: a DP step that claims noise multiplier 4 but adds (almost) none."""
    splits, dense, _ = setting
    broken = dataclasses.replace(DP, noise_multiplier=1e-6)
    row = canary_round(broken, dense, splits, SuiteSettings(canaries=1000), torch.Generator().manual_seed(3),
                       aggregate=None, accountant=accountant, accountant_noise=4.0)
    assert row["epsilon_lower_bound"] > row["epsilon_accountant"], row
