"""Pretraining end to end on a tiny config, the site-data helpers, and `ktfed pretrain` refusing
bad configs with the field named."""
import argparse
import json

import pytest
import torch

from kt_core.vln.adapt import AdapterConfig, adapt_backbone
from kt_core.vln.backbone import VLNConfig
from kt_core.vln.checkpoint import load_backbone
from kt_core.vln.finetune import (assign_levels, encode_demos, eval_seeds, evaluate_rollouts, site_data,
                                  site_seeds)
from kt_core.vln.pretrain import PretrainSettings, parse_config, run_pretraining
from ktfed.pretrain_cmd import register

LEVELS = ["BabyAI-GoToRedBallGrey-v0", "BabyAI-GoToObj-v0"]
TINY_TOML = """
[model]
d_model = 16
n_heads = 2
n_cross_layers = 1
[pretrain]
levels = ["BabyAI-GoToRedBallGrey-v0", "BabyAI-GoToObj-v0"]
episodes_per_level = 6
val_episodes = 3
rollout_episodes = 3
steps = 4
batch_size = 8
warmup_steps = 2
"""


def cli(argv):
    parser = argparse.ArgumentParser(prog="ktfed")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_pretrain_writes_checkpoint_card_and_curve(tmp_path):
    torch.manual_seed(0)
    model_cfg, settings = parse_config({"model": {"d_model": 16, "n_heads": 2, "n_cross_layers": 1},
                                        "pretrain": {"levels": LEVELS, "episodes_per_level": 6, "val_episodes": 3,
                                                     "rollout_episodes": 3, "steps": 4, "batch_size": 8,
                                                     "cache_dir": str(tmp_path / "cache")}})
    result = run_pretraining(model_cfg, settings, tmp_path / "out", progress=False)
    card = json.loads((tmp_path / "out" / "backbone.card.json").read_text())
    assert card["steps"] == 4 and card["data"]["levels"] == LEVELS and card["data"]["train_seeds"] == [0, 6]
    assert card["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert set(card["losses"]) >= {"final_mlm", "final_action"} and card["metrics"]["rollouts"]
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000
    loaded = load_backbone(tmp_path / "out" / "backbone.safetensors")
    assert loaded.config == result.model.cfg and loaded.config.vocab_size == len(loaded.tokenizer)
    # a site builds its model on the hosted backbone, trains, evaluates on unseen seeds
    model = adapt_backbone(loaded.model, AdapterConfig(n_factors=2))
    summary = evaluate_rollouts(model, loaded.tokenizer, LEVELS[0], 3, tmp_path / "cache")
    assert summary["episodes"] == 3 and 0 <= summary["spl"] <= summary["success_rate"] <= 1


def test_site_data_is_non_iid_and_disjoint_from_evaluation(tmp_path):
    assert assign_levels(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    with pytest.raises(ValueError, match="at least one level per site"):
        assign_levels(["a"], 2)
    s0, s1 = site_seeds(0, 5), site_seeds(1, 5)
    assert s0[1] <= s1[0] and s1[1] <= eval_seeds(5)[0] and PretrainSettings().val_seeds[1] <= s0[0]
    a = site_data(0, LEVELS[:1], 3, tmp_path)
    b = site_data(1, LEVELS[1:], 3, tmp_path)
    assert a.level == LEVELS[0] and b.level == LEVELS[1]
    assert set(a.episode_seeds.tolist()).isdisjoint(b.episode_seeds.tolist())
    from kt_core.vln.tokenizer import Tokenizer
    data = encode_demos(a, Tokenizer(), 12)
    assert len(data) == len(a) and data.tokens.shape == (len(a), 12)


@pytest.mark.parametrize("toml, message", [
    ("[model]\nwidth = 3\n", "model.width: unknown field"),
    ("[model]\nd_model = \"big\"\n", "model.d_model: expected an integer"),
    ("[model]\nd_model = 30\nn_heads = 4\n", "model.d_model: 30 is not divisible"),
    ("[model]\nvocab_size = 40\n", "model.vocab_size: unknown field"),
    ("[pretrain]\nlr = -1.0\n", "pretrain.lr: must be a finite number > 0"),
    ("[pretrain]\nsteps = true\n", "pretrain.steps: expected an integer"),
    ("[pretrain]\nlevels = [\"BabyAI-Nope-v0\"]\n", "pretrain.levels: unknown BabyAI level 'BabyAI-Nope-v0'"),
    ("[pretrain]\nlevels = [1, 2]\n", "pretrain.levels\\[0\\]: expected a string"),
    ("[pretrain]\nmask_prob = 1.5\n", "pretrain.mask_prob: must be in \\(0, 1\\)"),
    ("[train]\nsteps = 1\n", "train: unknown section"),
    ("[model\n", "not valid TOML"),
])
def test_cli_refuses_bad_config_naming_the_field(tmp_path, capsys, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert cli(["pretrain", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: invalid config" in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_cli_missing_config_and_existing_output(tmp_path, capsys):
    assert cli(["pretrain", "--config", str(tmp_path / "none.toml")]) == 2
    assert "file not found" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "backbone.safetensors").write_bytes(b"x")
    (tmp_path / "ok.toml").write_text(TINY_TOML)
    assert cli(["pretrain", "--config", str(tmp_path / "ok.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_pretrains_a_tiny_backbone(tmp_path, capsys):
    (tmp_path / "ok.toml").write_text(TINY_TOML + f'cache_dir = "{tmp_path / "cache"}"\n')
    assert cli(["pretrain", "--config", str(tmp_path / "ok.toml"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "backbone written to" in out and "sha256" in out
    assert load_backbone(tmp_path / "out" / "backbone.safetensors").config.d_model == 16


def test_pretraining_throughput_is_measured(tmp_path):
    from kt_core.vln.pretrain import pretraining_throughput
    from kt_core.vln.tokenizer import Tokenizer
    data = encode_demos(site_data(0, LEVELS[:1], 3, tmp_path), Tokenizer(), 12)
    rates = pretraining_throughput(VLNConfig.tiny(), data, "cpu", (4, 8), steps=2, warmup=1)
    assert set(rates) == {4, 8} and all(r > 0 for r in rates.values())


def test_pretraining_device_is_checked():
    with pytest.raises(ValueError, match="device: must be auto, cpu or cuda"):
        PretrainSettings(device="tpu").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: cuda was asked for"):
            PretrainSettings(device="cuda").validate()
