"""The federated VLN recipe: a private (personal) action head, and the validation seed block."""
import copy

import pytest
import torch

from kt_core import tasks
from kt_core.config import ConfigError, load_toml
from kt_core.manifest import Role, manifest_of
from kt_core.models import load_shared_state, private_state, shared_state
from kt_core.train import TrainConfig
from kt_core.vln.adapt import AdapterConfig, PrivateHead, adapt_backbone
from kt_core.vln.backbone import VLNBackbone, VLNConfig
from kt_core.factorized import Adapter
from kt_core.vln.finetune import (EVAL_SEED_BASE, MAX_SITES, DemoTensors, eval_seeds, evaluate, inference_copy,
                                  site_seeds, train_local, validation_seeds)
from tests.test_adapted import run_config_text, save_tiny_backbone
from tests.test_vln_model import batch

torch.set_num_threads(1)


def test_private_head_stays_at_the_site():
    base = VLNBackbone(VLNConfig.tiny(n_cross_layers=1)).eval()
    tokens, image, direction, actions = batch(16)
    before = base.act(tokens, image, direction)
    model = adapt_backbone(copy.deepcopy(base), AdapterConfig(n_factors=4, private_head=True))
    assert isinstance(model.action_head, PrivateHead)
    assert torch.allclose(model.eval().act(tokens, image, direction), before, atol=1e-5)   # same function
    manifest = manifest_of(model)
    assert manifest.role_of("action_head.weight") is Role.PRIVATE and manifest.role_of("action_head.bias") is Role.PRIVATE
    assert not any(n.startswith("action_head") for n in shared_state(model))
    assert {"action_head.weight", "action_head.bias"} <= set(private_state(model))
    # it trains, and a global state (the shared factors only) loaded over it leaves it alone
    head = private_state(model)["action_head.weight"]
    train_local(model, DemoTensors(tokens, image, direction, actions),
                TrainConfig(epochs=1, batch_size=8, lr=1e-2, optimizer="adam"))
    trained = private_state(model)["action_head.weight"]
    assert not torch.equal(trained, head)
    other = adapt_backbone(copy.deepcopy(base), AdapterConfig(n_factors=4, private_head=True))
    load_shared_state(model, shared_state(other))
    assert torch.equal(private_state(model)["action_head.weight"], trained)


def test_private_head_needs_a_trained_head_and_the_default_is_shared():
    assert AdapterConfig().private_head is False
    with pytest.raises(ValueError, match="private_head"):
        AdapterConfig(train_head=False, private_head=True).validate()
    with pytest.raises(ValueError, match="private_head"):
        AdapterConfig.from_dict({"private_head": "yes"})
    shared = adapt_backbone(VLNBackbone(VLNConfig.tiny()), AdapterConfig(n_factors=2))
    assert "action_head.weight" in shared_state(shared)


def test_run_config_private_head_round_trips_through_the_adapted_file(tmp_path):
    hosted = tmp_path / "backbone.safetensors"
    sha = save_tiny_backbone(hosted)
    text = run_config_text(hosted, n_factors=2) + "private_head = true\n"
    config = tasks.with_backbone_digest(load_toml(text), sha)
    assert config.vln.adapter.private_head
    model = tasks.build(config, hosted).model
    with torch.no_grad():
        model.action_head.weight.add_(0.5)
    path = tmp_path / "adapted.safetensors"
    tasks.save_adapted(path, model, config, site="site-a", levels=[], run_id="r", round_no=1,
                       global_state_digest=tasks.state_digest_of(shared_state(model)))
    loaded = tasks.load_adapted(path, backbone=hosted)
    assert torch.equal(loaded.model.action_head.weight, model.action_head.weight)
    with pytest.raises(ConfigError, match="private_head"):
        load_toml(run_config_text(hosted) + "train_head = false\nprivate_head = true\n")


@pytest.mark.parametrize("adapter", ["waffle", "lora"])
def test_inference_copy_folds_the_adapters_into_the_same_function(adapter):
    model = adapt_backbone(VLNBackbone(VLNConfig.tiny(n_cross_layers=1)), AdapterConfig(adapter=adapter, n_factors=4))
    tokens, image, direction, actions = batch(16)
    data = DemoTensors(tokens, image, direction, actions)
    train_local(model, data, TrainConfig(epochs=2, batch_size=8, lr=1e-2, optimizer="adam"))   # a non-zero delta
    model.train()
    merged = inference_copy(model)
    assert not any(isinstance(m, Adapter) for m in merged.modules()) and not merged.training
    assert model.training and any(isinstance(m, Adapter) for m in model.modules())   # the model is left alone
    expected = model.eval().act(tokens, image, direction)
    assert torch.allclose(merged.act(tokens, image, direction), expected, atol=1e-5)
    assert evaluate(model, data)["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(expected, actions).item(), rel=1e-4)


def test_seed_blocks_are_disjoint():
    last_site = site_seeds(MAX_SITES - 1, 10_000)
    assert last_site[1] <= EVAL_SEED_BASE == eval_seeds(1)[0]
    assert eval_seeds(1_000_000)[1] <= validation_seeds(1)[0]
    with pytest.raises(ValueError):
        site_seeds(MAX_SITES, 1)            # would reach into the evaluation block
    with pytest.raises(ValueError):
        eval_seeds(1_000_001)               # would reach into the validation block
    with pytest.raises(ValueError):
        validation_seeds(0)


def test_bench_summary_statistics():
    from bench.vln_fed import mean_se

    assert mean_se([0.5]) == (0.5, 0.0)
    m, se = mean_se([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4) and se == pytest.approx(0.2 / 3 ** 0.5)


def test_the_episode_counts_a_run_asks_of_a_site_are_bounded():
    from kt_core.config import MAX_EPISODES, VLNSettings

    for name in ("episodes_per_level", "eval_episodes", "rollout_episodes", "round_rollout_episodes"):
        with pytest.raises(ValueError, match=name):
            VLNSettings(**{name: MAX_EPISODES + 1}).validate()
        with pytest.raises(ValueError, match=name):
            VLNSettings(**{name: -1}).validate()
    VLNSettings(rollout_episodes=0, round_rollout_episodes=0).validate()
