"""The navigation student: mixing a VLN backbone's embeddings, the student's size, and a site run
on real BabyAI demonstrations whose teacher is the site's adapted model (a state dir made here
without a federation; tests/test_adapted_federation.py makes one with a real federation)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kt_core.distill.bert import StudentTooLargeError
from kt_core.distill.checkpoint import CheckpointError
from kt_core.distill.config import load_site_config
from kt_core.distill.loop import count_parameters
from kt_core.config_file import ConfigError
from kt_core.distill.mixkd import Mix
from kt_core.distill.nav import VLNMixable, build_nav_student, model_size
from kt_core.vln.backbone import VLNBackbone, VLNConfig

torch.set_num_threads(1)
LEVEL = "BabyAI-GoToLocal-v0"


def fake_batch(cfg: VLNConfig, b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 5, 4, 6][:b])
    tokens = torch.randint(5, cfg.vocab_size, (b, 6), generator=g)
    tokens[:, 0] = 1  # [CLS]
    mask = torch.arange(6)[None] < lengths[:, None]
    tokens = tokens * mask
    images = torch.stack([torch.randint(0, n, (b, 7, 7), generator=g) for n in cfg.grid_values], -1).to(torch.uint8)
    return {"tokens": tokens, "mission_mask": mask.long(), "images": images,
            "directions": torch.randint(0, 4, (b,), generator=g), "labels": torch.randint(0, 7, (b,), generator=g)}


def test_mixable_view_equals_the_backbone():
    cfg = VLNConfig.tiny()
    backbone = VLNBackbone(cfg).eval()
    batch = fake_batch(cfg)
    expected = backbone.act(batch["tokens"], batch["images"], batch["directions"])
    torch.testing.assert_close(VLNMixable(backbone)(batch), expected)
    # λ = 1 mixing gives back the originals, whatever the partner
    mixed = VLNMixable(backbone)(batch, Mix(torch.tensor([1, 2, 3, 0]), torch.ones(4)), originals=False)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)


def test_default_student_is_at_least_four_times_smaller():
    teacher = VLNBackbone(VLNConfig())
    student = build_nav_student(teacher)
    assert count_parameters(teacher) / count_parameters(student) >= 4
    assert student.cfg.d_model == teacher.cfg.d_model // 2 and student.cfg.n_cross_layers == 1
    with pytest.raises(StudentTooLargeError, match="student_d_model: 192 > the teacher's 96"):
        build_nav_student(teacher, d_model=192)
    with pytest.raises(StudentTooLargeError, match="student_cross_layers: 3 > the teacher's 2"):
        build_nav_student(teacher, cross_layers=3)
    # the site's default: the widest student within a quarter of the backbone
    budget = model_size(teacher) // 4
    widest = build_nav_student(teacher, max_parameters=budget)
    assert model_size(widest) <= budget and widest.cfg.d_model > teacher.cfg.d_model // 2
    assert model_size(build_nav_student(teacher, d_model=widest.cfg.d_model + 8)) > budget
    cross_only = VLNBackbone(VLNConfig(n_lang_layers=0, n_vision_layers=0))
    with pytest.raises(StudentTooLargeError, match="not fewer than the teacher's"):
        build_nav_student(cross_only, d_model=96, cross_layers=2)


def test_nav_options_name_the_field(tmp_path):
    (tmp_path / "site.toml").write_text('[distill]\ntask = "nav"\nteacher = "t.safetensors"\n'
                                        '[distill.nav]\nepisodes = 0\n')
    with pytest.raises(ConfigError, match="distill.nav.episodes: must be an integer >= 1"):
        load_site_config(tmp_path / "site.toml")
    (tmp_path / "site.toml").write_text('[distill]\ntask = "nav"\nteacher = "t.safetensors"\n'
                                        '[distill.nav]\nlevel = "x"\n')
    with pytest.raises(ConfigError, match="distill.nav.level: unknown setting"):
        load_site_config(tmp_path / "site.toml")
    (tmp_path / "site.toml").write_text('[distill]\ntask = "nav"\nteacher = "t.safetensors"\n'
                                        '[distill.nav]\nrollout_epsilon = 1.5\n')
    with pytest.raises(ConfigError, match="distill.nav.rollout_epsilon: must be a number in"):
        load_site_config(tmp_path / "site.toml")


@pytest.fixture(scope="module")
def nav_site(tmp_path_factory):
    """A site's state dir after a run, made here without one (tests.test_adapted): a tiny backbone
    in its cache and site-a's adapted model, adapters trained on its 40 GoToLocal episodes.
    tests/test_adapted_federation.py does the same from a real federation."""
    from tests.test_adapted import make_adapted_site

    return make_adapted_site(tmp_path_factory.mktemp("nav"))


def site_config(state, extra_nav: str = "") -> Path:
    path = state / "site.toml"
    path.write_text(f"""
[distill]
task = "nav"
teacher = "adapted-run-test.safetensors"
method = "mixkd"
epochs = 1
batch_size = 32
lr = 3e-3
device = "cpu"
out_dir = "out"

[distill.nav]
demo_cache = "{state.parent / 'demos'}"
{extra_nav}
""")
    return path


def test_site_distills_its_federated_model(nav_site):
    from kt_core.vln.checkpoint import load_backbone

    from participant.distiller import REPORT_FILE, STUDENT_FILE, run_distill

    report = run_distill(load_site_config(site_config(nav_site)), progress=False)
    for who in ("teacher", "student"):
        test = report[who]["test"]
        assert 0 <= test["success_rate"] <= 1 and 0 <= test["spl"] <= test["success_rate"] + 1e-9
        assert 0 <= test["action_accuracy"] <= 1
    teacher = report["teacher"]
    assert (teacher["site"], teacher["run_id"], teacher["round"]) == ("site-a", "run-test", 2)
    # the site's own demonstrations: its level, its seed block, its episode count; the run's rollouts
    assert report["levels"] == [LEVEL] and report["data"]["site_index"] == 0
    assert report["data"]["train_episodes"] == 40 and report["data"]["eval_episodes_per_level"] == 4
    assert report["compression"] > report["compression_vs_backbone"] > 1
    assert report["history"]["epochs"][0]["parts"].keys() == {"ce", "kd", "mix_kd", "mix_ce"}
    # teacher-labelled rollouts on the site's own training seeds (the default) add states
    data = report["data"]
    assert data["teacher_rollout_samples"] > 0 and data["teacher_rollouts"]["passes"] == 2
    assert data["train_samples"] == data["demonstration_samples"] + data["teacher_rollout_samples"]
    student = load_backbone(nav_site / "out" / STUDENT_FILE)
    assert student.config.d_model == 16 and student.config.n_cross_layers == 1
    assert json.loads((nav_site / "out" / REPORT_FILE).read_text())["student"]["sha256"] == report["student"]["sha256"]
    card = json.loads((nav_site / "out" / "student.card.json").read_text())
    assert card["distilled_from"]["adapted_sha256"] == teacher["sha256"]


def test_other_levels_or_seed_block_than_the_teachers_are_refused(nav_site):
    from participant.distiller import run_distill

    with pytest.raises(ConfigError, match="distill.nav.levels: .* adapted on .'BabyAI-GoToLocal-v0'."):
        run_distill(load_site_config(site_config(nav_site, 'levels = ["BabyAI-GoToObj-v0"]')), progress=False)
    with pytest.raises(ConfigError, match="distill.nav.site_index: 1, but the teacher is site-a's model"):
        run_distill(load_site_config(site_config(nav_site, "site_index = 1")), progress=False)


def test_nav_teacher_that_is_not_a_sites_adapted_model(nav_site, tmp_path):
    from participant.distiller import run_distill

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    (tmp_path / "bad.toml").write_text('[distill]\ntask = "nav"\nteacher = "junk.safetensors"\ndevice = "cpu"\n')
    with pytest.raises(CheckpointError, match="distill.teacher: adapted model .*junk.safetensors: not a readable"):
        run_distill(load_site_config(tmp_path / "bad.toml"), progress=False)
    (tmp_path / "none.toml").write_text('[distill]\ntask = "nav"\nteacher = "missing.safetensors"\ndevice = "cpu"\n')
    with pytest.raises(CheckpointError, match="missing.safetensors: file not found"):
        run_distill(load_site_config(tmp_path / "none.toml"), progress=False)
    # a plain backbone checkpoint (the un-federated model) is not a site's adapted model
    backbone = next((nav_site / "backbones").glob("*.safetensors"))
    (tmp_path / "plain.toml").write_text(f'[distill]\ntask = "nav"\nteacher = "{backbone}"\ndevice = "cpu"\n')
    with pytest.raises(CheckpointError, match="format 'ktfed-vln-backbone/1', expected 'ktfed-adapted-model/1'"):
        run_distill(load_site_config(tmp_path / "plain.toml"), progress=False)
    # the image task's adapted model is no navigation teacher
    from kt_core import tasks
    from kt_core.config import load_toml
    from tests.conftest import fast_config

    config = load_toml(fast_config())
    image = tasks.save_adapted(tmp_path / "image.safetensors", tasks.build(config).model, config, site="site-a",
                               levels=[], run_id="x", round_no=1, global_state_digest="")
    assert image["task"] == "image"
    (tmp_path / "image.toml").write_text('[distill]\ntask = "nav"\nteacher = "image.safetensors"\ndevice = "cpu"\n')
    with pytest.raises(CheckpointError, match="a site's model of the 'image' task, not a navigation model"):
        run_distill(load_site_config(tmp_path / "image.toml"), progress=False)


def test_wrong_backbone_for_the_nav_teacher(nav_site, tmp_path):
    from participant.distiller import run_distill
    from tests.test_adapted import save_tiny_backbone

    save_tiny_backbone(tmp_path / "other.safetensors", seed=1)
    cfg = site_config(nav_site, f'backbone = "{tmp_path / "other.safetensors"}"')
    with pytest.raises(CheckpointError, match="backbone digest mismatch"):
        run_distill(load_site_config(cfg), progress=False)


def test_cli_summary_names_the_federated_teacher_and_refuses_finetuning_it(nav_site, capsys):
    import argparse

    from ktfed.distill_cmd import register

    parser = argparse.ArgumentParser(prog="ktfed")
    register(parser.add_subparsers().add_parser("participant").add_subparsers())
    args = parser.parse_args(["participant", "distill", "--config", str(site_config(nav_site)),
                              "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "teacher: site-a's federated model, run run-test after round 2" in out and "test SPL: student" in out
    args = parser.parse_args(["participant", "distill", "--config", str(site_config(nav_site)), "--finetune-teacher"])
    assert args.func(args) == 2
    assert "--finetune-teacher is for the text task" in capsys.readouterr().err


def test_teacher_rollouts_stay_on_the_sites_seeds_and_carry_the_teachers_labels(nav_site, monkeypatch):
    import kt_core.vln.babyai as babyai
    from kt_core.distill.nav import (NavOptions, VLNMixable, load_nav_teacher, site_level_demos,
                                     teacher_rollout_dataset)

    loaded = load_nav_teacher(nav_site / "adapted-run-test.safetensors")
    opts = NavOptions().for_teacher(loaded)
    site = site_level_demos(opts, nav_site.parent / "demos")
    seeds_used = []
    real = babyai.rollout
    monkeypatch.setattr(babyai, "rollout", lambda policy, level, seeds, lengths, **kw:
                        seeds_used.append((level, list(seeds), kw)) or real(policy, level, seeds, lengths, **kw))
    data = teacher_rollout_dataset(loaded.model, loaded.tokenizer, site, passes=1, epsilon=0.5, max_steps=3)
    assert [(lv, s) for lv, s, _ in seeds_used] == [(lv, d.episode_seeds.tolist()) for lv, d in site.items()]
    assert seeds_used[0][2] == {"max_steps": 3}
    assert 0 < len(data) <= 3 * sum(d.num_episodes for d in site.values())
    with torch.no_grad():
        assert torch.equal(data.tensors["labels"], VLNMixable(loaded.model.eval())(data.tensors).argmax(-1))
    assert teacher_rollout_dataset(loaded.model, loaded.tokenizer, site, passes=0) is None
    half = site_level_demos(opts, nav_site.parent / "demos", data_fraction=0.5)
    assert sum(d.num_episodes for d in half.values()) == -(-sum(d.num_episodes for d in site.values()) // 2)


def test_nav_and_text_get_their_own_training_defaults(tmp_path):
    from kt_core.distill.config import NAV_DEFAULTS, TEXT_DEFAULTS, parse_distill
    nav = parse_distill({"task": "nav", "teacher": "adapted.safetensors"}, base=tmp_path)
    text = parse_distill({"task": "text", "teacher": "teacher.safetensors"}, base=tmp_path)
    assert (nav.train.epochs, nav.train.lr) == NAV_DEFAULTS != TEXT_DEFAULTS == (text.train.epochs, text.train.lr)
    given = parse_distill({"task": "nav", "teacher": "adapted.safetensors", "epochs": 2, "lr": 0.01}, base=tmp_path)
    assert (given.train.epochs, given.train.lr) == (2, 0.01)
