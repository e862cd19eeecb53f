"""WAFFLe learns and personalizes on small non-IID federations: fast cases on tiny digits splits.

The federations go through bench.waffle_sim, i.e. the coordinator's own FedAvg and kt_core's
training; each case takes seconds.
"""
import dataclasses

import numpy as np
import pytest
import torch

from bench.waffle_sim import gate_stats, majority_floor, simulate, swap_test
from kt_core.data import PartitionSpec, load_dataset, site_split
from kt_core.factorized import FactorizedLinear, ScaledLRParameter
from kt_core.models import (ModelConfig, build_model, kl_divergence, load_private_state, private_state,
                             shared_state)
from kt_core.train import TrainConfig, evaluate, make_optimizer_for, train_local

SGD = TrainConfig(lr=0.05, batch_size=32, max_grad_norm=1.0)
ADAM = TrainConfig(lr=3e-3, batch_size=32, optimizer="adam", max_grad_norm=1.0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", max_train=600, max_test=300)


def _splits(data, n_sites, spec):
    sites = [f"site-{i}" for i in range(n_sites)]
    out = {}
    for s in sites:
        parts = site_split(data, sites, s, spec)
        if len(parts[1]) and len(parts[3]):
            out[s] = tuple(torch.from_numpy(a) for a in parts)
    return out


def _model_cfg(data):
    return ModelConfig(input_dim=data.input_dim, hidden=(64,), num_classes=10)


@pytest.mark.parametrize("train", [SGD, ADAM], ids=["sgd", "adam"])
def test_waffle_beats_the_majority_floor_on_a_small_dirichlet_split(digits, train):
    splits = _splits(digits, 4, PartitionSpec("dirichlet", alpha=0.3, seed=5))
    floor = majority_floor(splits)
    r = simulate("waffle", splits, _model_cfg(digits), train, rounds=12)
    acc = r["accuracy"]
    assert np.mean(list(acc.values())) > np.mean(list(floor.values())) + 0.1
    assert all(acc[s] >= floor[s] - 0.05 for s in splits), (acc, floor)


def test_sites_with_disjoint_labels_select_different_factors_and_their_own_selection_wins(digits):
    # 4 sites, 2 classes each, no class shared: the selections must differ, and a site's own
    # selection must serve its data better than the others' do (the swap test)
    splits = _splits(digits, 4, PartitionSpec("shards", classes_per_site=2, seed=1))
    labels = [set(v[1].tolist()) for v in splits.values()]
    assert all(not (a & b) for i, a in enumerate(labels) for b in labels[i + 1:])
    # The selection alone (the output bias shared): with a private output bias, 2-class sites
    # get 0.97-0.99 from their bias and the shared features, and their gates have little left to
    # part on (test_a_site_s_private_state_serves_it_better_than_another_s covers that case).
    # 30 rounds: with 5 factors on the seeded base Adam's gates take longer to part on this tiny
    # split than 16 factors from scratch did (accuracy 0.35 at 10 rounds, 0.60 at 30)
    cfg = dataclasses.replace(_model_cfg(digits), private_output_bias=False)
    r = simulate("waffle", splits, cfg, ADAM, rounds=30)
    stats = gate_stats(r["models"], r["initial_gates"])
    assert stats["distinct_patterns"] == len(splits)
    assert stats["mean_pairwise_hamming"] > 0.1
    swap = swap_test(r["models"], splits)
    assert swap["mean_gain"] > 0.1 and swap["own_wins"] >= 0.75
    # the own selection's accuracy is the simulation's last score: handing it in changes nothing
    assert swap_test(r["models"], splits, own=r["accuracy"]) == swap


@pytest.mark.parametrize("train", [SGD, ADAM], ids=["sgd", "adam"])
def test_a_site_s_private_state_serves_it_better_than_another_s(digits, train):
    # the default model (selection and output bias private), disjoint labels: a site's whole
    # private state beats any other site's on the site's data, with the same shared state
    splits = _splits(digits, 4, PartitionSpec("shards", classes_per_site=2, seed=1))
    r = simulate("waffle", splits, _model_cfg(digits), train, rounds=10, curve=False)
    states = {s: private_state(m) for s, m in r["models"].items()}
    for site, (_, _, tx, ty) in splits.items():
        model = r["models"][site]
        for other in splits:
            if other != site:
                load_private_state(model, states[other])
                assert evaluate(model, tx, ty)["accuracy"] < r["accuracy"][site] - 0.3, (site, other)
        load_private_state(model, states[site])
        assert evaluate(model, tx, ty)["accuracy"] == r["accuracy"][site]


def test_a_site_training_alone_scores_the_same_after_the_round_as_after_local_training(digits):
    splits = _splits(digits, 3, PartitionSpec("dirichlet", alpha=0.5, seed=2))
    r = simulate("local", splits, _model_cfg(digits), SGD, rounds=2, curve=False)
    assert r["accuracy"] == r["accuracy_after_local_training"] and r["bytes_per_round_per_site"] == 0


@pytest.mark.parametrize("train", [SGD, ADAM], ids=["sgd", "adam"])
def test_gates_move_at_their_own_learning_rate(digits, train):
    # under Adam a gradient multiplier would be normalized away: the parameter group is what
    # gives the variational parameters gate_lr_scale times the step of the dictionary
    model = build_model(_model_cfg(digits))
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    # compared with r, which steps at the plain learning rate (the dictionary has its own
    # multiplier, DICT_LR_SCALE)
    before = [(m.gate_logits.detach().clone(), m.r.detach().clone()) for m in layers]
    train_local(model, digits.train_x[:200], digits.train_y[:200], dataclasses.replace(train, max_steps=10))
    gate_move = np.mean([float((m.gate_logits.detach() - g).abs().mean()) for m, (g, _) in zip(layers, before)])
    r_move = np.mean([float((m.r.detach() - r).abs().mean()) for m, (_, r) in zip(layers, before)])
    assert gate_move > 0.05
    assert gate_move > 10 * r_move


def test_scaled_parameters_get_their_own_optimizer_group_even_from_a_plain_list():
    # the DP engine hands make_optimizer_for a plain parameter list: the mark travels with the
    # parameter itself, and survives a deep copy
    import copy

    layer = copy.deepcopy(FactorizedLinear(6, 4, n_factors=5, gate_lr_scale=40.0))
    assert isinstance(layer.gate_logits, ScaledLRParameter) and layer.kuma_log_b.lr_scale == 40.0
    sgd_gates = round(40.0 * FactorizedLinear.SGD_PRIVATE_LR_FACTOR, 6)
    assert layer.kuma_log_b.sgd_lr_scale == pytest.approx(sgd_gates)
    for cfg, gates in ((SGD, sgd_gates), (ADAM, 40.0)):
        opt = make_optimizer_for(list(layer.parameters()), cfg)
        lrs = {round(g["lr"] / cfg.lr, 6): len(g["params"]) for g in opt.param_groups}
        # r and bias at lr, the dictionary at DICT_LR_SCALE x lr, gates and sticks at 40 x lr
        # under Adam and a tenth of that under SGD
        assert lrs == {1.0: 2, FactorizedLinear.DICT_LR_SCALE: 2, gates: 3}


def test_the_run_configs_dictionary_multiplier_reaches_every_waffle_layers_optimizer_group():
    # [model] dict_lr_scale (the image demo's recipe takes 4): w_a and w_b of each layer step at
    # that multiple of lr, under SGD and Adam, and the default is FactorizedLinear.DICT_LR_SCALE
    for scale, expected in ((None, FactorizedLinear.DICT_LR_SCALE), (4.0, 4.0), (0.5, 0.5)):
        kw = {} if scale is None else {"dict_lr_scale": scale}
        model = build_model(ModelConfig(input_dim=8, hidden=(6,), num_classes=3, **kw))
        for cfg in (SGD, ADAM):
            opt = make_optimizer_for(list(model.parameters()), cfg)
            groups = {id(p): g["lr"] / cfg.lr for g in opt.param_groups for p in g["params"]}
            dictionary = [m for layer in model.layers for m in (layer.w_a, layer.w_b)]
            assert all(groups[id(p)] == pytest.approx(expected) for p in dictionary)
    with pytest.raises(ValueError, match="dict_lr_scale"):
        FactorizedLinear(6, 4, dict_lr_scale=float("inf"))


def _first_step_loss(model_cfg, x, y, kl_weight):
    cfg = TrainConfig(lr=1e-6, batch_size=16, max_steps=1, kl_weight=kl_weight, seed=3)
    return train_local(build_model(model_cfg), x, y, cfg).loss


def test_the_kl_is_spread_over_the_sites_own_sample_count(digits):
    # every sample identical, so the cross-entropy of the first batch does not depend on N; the
    # KL part of the loss must then be KL / N with N the site's own count
    cfg = _model_cfg(digits)
    x1, y1 = digits.train_x[:1], digits.train_y[:1]
    kl = kl_divergence(build_model(cfg).eval()).item()
    assert kl > 0
    parts = {}
    for n in (16, 160):
        x, y = np.repeat(x1, n, axis=0), np.repeat(y1, n)
        parts[n] = (_first_step_loss(cfg, x, y, 1.0) - _first_step_loss(cfg, x[:16], y[:16], 0.0)) * n
    # the same sampled KL in both (same seed), so N * (loss - CE) is the same number
    assert parts[16] == pytest.approx(parts[160], rel=1e-3)
    assert parts[16] > 0


@pytest.mark.parametrize("train", [SGD, ADAM], ids=["sgd", "adam"])
def test_a_site_with_a_handful_of_samples_keeps_the_shared_network_and_its_floor(digits, train):
    # quantity skew: one site holds 2 samples. Its per-site ELBO leaves it near the IBP prior; the
    # prior must keep it on (about) the network the large sites shaped, not on the first few
    # factors alone (at the old alpha = 4 it kept 31% of its gates and scored 0 under SGD)
    splits = _splits(digits, 6, PartitionSpec("quantity", alpha=0.5, seed=3))
    sizes = {s: len(v[1]) for s, v in splits.items()}
    small, big = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    assert sizes[small] <= 5 < 100 < sizes[big]
    r = simulate("waffle", splits, _model_cfg(digits), train, rounds=12, curve=False)

    def on(site):
        return float(np.mean([m.mode_gates().mean() for m in r["models"][site].modules()
                              if isinstance(m, FactorizedLinear)]))

    # most of the network, in the 1/5 steps that K = 5 factors allow per layer (the large site
    # may keep all of them on). With the output bias private, the bias carries the label prior
    # and the output layer keeps 2-3 of its 5 factors at every site (0.7 at the large site too)
    assert on(small) >= 0.6, (on(small), on(big))
    assert r["accuracy"][small] >= majority_floor(splits)[small]


def test_the_output_bias_stays_at_the_site_and_learns_its_own_label_mix(digits):
    # 4 sites, 2 classes each, none shared: each site's private output bias must favour its own
    # classes, and the bias is never part of what a site sends
    splits = _splits(digits, 4, PartitionSpec("shards", classes_per_site=2, seed=1))
    r = simulate("waffle", splits, _model_cfg(digits), ADAM, rounds=5, curve=False)
    for site, (_, y, _, _) in splits.items():
        model = r["models"][site]
        assert "layers.1.bias" in private_state(model) and "layers.1.bias" not in shared_state(model)
        bias, own = model.layers[1].bias.detach(), sorted(set(y.tolist()))
        others = [c for c in range(10) if c not in own]
        assert float(bias[own].min()) > float(bias[others].max()), (site, own, bias)
    # a bias learned at one site alone: its own multiplier, under SGD as under Adam
    layer = FactorizedLinear(6, 4, n_factors=5, private_bias=True)
    assert isinstance(layer.bias, ScaledLRParameter)
    assert layer.bias.lr_scale == FactorizedLinear.PRIVATE_BIAS_LR_SCALE > 1
    # (a tenth of it under SGD, whose step grows with the gradient: SGD_PRIVATE_LR_FACTOR)
    for cfg, factor in ((SGD, FactorizedLinear.SGD_PRIVATE_LR_FACTOR), (ADAM, 1.0)):
        opt = make_optimizer_for(list(layer.parameters()), cfg)
        group = next(g for g in opt.param_groups if any(p is layer.bias for p in g["params"]))
        assert group["lr"] == pytest.approx(cfg.lr * FactorizedLinear.PRIVATE_BIAS_LR_SCALE * factor)
