"""A site's optimizer kept from round to round (kt_core.site_optimizer) and on its disk."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from kt_core.config import load_toml
from kt_core.data import load_dataset
from kt_core.models import ModelConfig, build_model
from kt_core.site_optimizer import OptimizerStateError, SiteOptimizer
from kt_core.train import TrainConfig, train_local
from participant.trainer import LocalTrainer
from tests.conftest import fast_config

ADAM = TrainConfig(lr=3e-3, optimizer="adam", batch_size=32, max_steps=3)
SGD = TrainConfig(lr=0.05, optimizer="sgd", momentum=0.9, batch_size=32, max_steps=3)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    return torch.from_numpy(d.train_x[:200]), torch.from_numpy(d.train_y[:200]), d


def _model(d):
    return build_model(ModelConfig(input_dim=d.input_dim, hidden=(32,), num_classes=d.num_classes, n_factors=4))


def _round(model, site_opt, x, y, cfg, seed):
    cfg = dataclasses.replace(cfg, seed=seed)
    return train_local(model, x, y, cfg, optimizer=site_opt.for_round(cfg))


def test_the_same_optimizer_carries_its_steps_into_the_next_round(digits):
    x, y, d = digits
    model = _model(d)
    site = SiteOptimizer(model)
    _round(model, site, x, y, ADAM, 1)
    first = site.optimizer
    _round(model, site, x, y, ADAM, 2)
    assert site.optimizer is first
    steps = {float(s["step"]) for s in first.state.values()}
    assert steps == {6.0}   # two rounds of 3 steps, one Adam state


def test_a_new_learning_rate_keeps_each_groups_multiplier(digits):
    x, y, d = digits
    model = _model(d)
    site = SiteOptimizer(model)
    before = [g["lr"] / ADAM.lr for g in site.for_round(ADAM).param_groups]
    after = [g["lr"] for g in site.for_round(dataclasses.replace(ADAM, lr=1e-3)).param_groups]
    assert after == pytest.approx([1e-3 * s for s in before]) and max(before) > 1   # the gates' group


def test_another_optimizer_kind_or_no_keeping_starts_afresh(digits):
    x, y, d = digits
    model = _model(d)
    site = SiteOptimizer(model)
    adam = site.for_round(ADAM)
    assert isinstance(site.for_round(SGD), torch.optim.SGD) and site.optimizer is not adam
    assert site.for_round(dataclasses.replace(SGD, keep_optimizer_state=False)) is None
    with pytest.raises(ValueError, match="keep_optimizer_state"):
        dataclasses.replace(SGD, keep_optimizer_state="yes").validate()


@pytest.mark.parametrize("cfg", [ADAM, SGD], ids=["adam", "sgd"])
def test_a_site_restarted_from_disk_trains_on_as_if_it_never_stopped(digits, tmp_path, cfg):
    x, y, d = digits
    model = _model(d)
    site = SiteOptimizer(model)
    _round(model, site, x, y, cfg, 1)
    site.save(tmp_path / "opt.safetensors")
    restarted = _model(d)
    restarted.load_state_dict(model.state_dict())
    again = SiteOptimizer(restarted)
    assert again.load(tmp_path / "opt.safetensors", cfg)
    _round(model, site, x, y, cfg, 2)
    _round(restarted, again, x, y, cfg, 2)
    for (name, a), b in zip(model.state_dict().items(), restarted.state_dict().values()):
        assert torch.equal(a, b), name


def _saved(digits, tmp_path, cfg=ADAM):
    x, y, d = digits
    model = _model(d)
    site = SiteOptimizer(model)
    _round(model, site, x, y, cfg, 1)
    path = tmp_path / "opt.safetensors"
    site.save(path)
    return path, _model(d)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update({"layers.0.w_a::exp_avg": torch.zeros(3)}), "layers.0.w_a::exp_avg.*shape"),
    (lambda t: t.update({"layers.9.w_a::exp_avg": torch.zeros(3)}), "names no trainable parameter"),
    (lambda t: t.update({"layers.0.w_a::momentum_buffer": torch.zeros_like(t["layers.0.w_a::exp_avg"])}),
     "'momentum_buffer' is not state of adam"),
    (lambda t: t.update({"layers.0.w_a::exp_avg_sq": -torch.ones_like(t["layers.0.w_a::exp_avg_sq"])}),
     "non-finite or negative"),
    (lambda t: t.pop("layers.0.w_a::exp_avg_sq"), "lacks \\['exp_avg_sq'\\]"),
])
def test_a_damaged_state_file_is_refused_naming_what_is_wrong(digits, tmp_path, damage, message):
    path, model = _saved(digits, tmp_path)
    tensors = load_file(str(path))
    damage(tensors)
    save_file(tensors, str(path))
    site = SiteOptimizer(model)
    with pytest.raises(OptimizerStateError, match=message):
        site.load(path, ADAM)
    assert site.optimizer is None   # nothing half-restored


def test_a_torn_file_is_refused_and_a_missing_one_is_no_state(digits, tmp_path):
    path, model = _saved(digits, tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(OptimizerStateError, match="unusable"):
        SiteOptimizer(model).load(path, ADAM)
    assert not SiteOptimizer(model).load(tmp_path / "none.safetensors", ADAM)


def test_the_participant_keeps_its_optimizer_state_beside_its_private_factors(tmp_path):
    config = load_toml(fast_config(sites=["site-a", "site-b"], epochs=1)).resolved()
    trainer = LocalTrainer("site-a", "run-1", config, tmp_path)
    trainer.train(epochs=1, batch_size=32, lr=0.05, max_steps=2, seed=1, round_no=1, attempt_id="a1")
    trainer.save_private()
    assert (tmp_path / "optimizer-run-1.safetensors").exists()
    kept = trainer.optimizer.state_tensors()
    resumed = LocalTrainer("site-a", "run-1", config, tmp_path).optimizer.state_tensors()
    assert kept and resumed.keys() == kept.keys()
    assert all(torch.equal(resumed[name], value) for name, value in kept.items())
