"""The navigation student: mixing a VLN backbone's embeddings, the student's size, and a site run
on real BabyAI demonstrations with a small stand-in teacher trained here."""
from __future__ import annotations

import json

import pytest
import torch

from kt_core.distill.bert import StudentTooLargeError
from kt_core.distill.checkpoint import CheckpointError
from kt_core.distill.config import load_site_config
from kt_core.distill.loop import count_parameters, fit
from kt_core.distill.mixkd import DistillConfig, DistillConfigError, Mix, make_objective
from kt_core.distill.nav import VLNMixable, build_nav_student, demo_dataset
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
    cross_only = VLNBackbone(VLNConfig(n_lang_layers=0, n_vision_layers=0))
    with pytest.raises(StudentTooLargeError, match="not fewer than the teacher's"):
        build_nav_student(cross_only, d_model=96, cross_layers=2)


def test_nav_options_name_the_field(tmp_path):
    (tmp_path / "site.toml").write_text('[distill]\ntask = "nav"\nteacher = "t.safetensors"\n'
                                        '[distill.nav]\nepisodes = 0\n')
    with pytest.raises(DistillConfigError, match="distill.nav.episodes: must be an integer >= 1"):
        load_site_config(tmp_path / "site.toml")
    (tmp_path / "site.toml").write_text('[distill]\ntask = "nav"\nteacher = "t.safetensors"\n'
                                        '[distill.nav]\nlevel = "x"\n')
    with pytest.raises(DistillConfigError, match="distill.nav.level: unknown setting"):
        load_site_config(tmp_path / "site.toml")


@pytest.fixture(scope="module")
def nav_site(tmp_path_factory):
    """A stand-in teacher (a tiny backbone trained by behaviour cloning on 40 bot episodes) and a
    site config that distills it on the same demonstrations."""
    from kt_core.vln.checkpoint import save_backbone
    from kt_core.vln.finetune import site_data
    from kt_core.vln.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("nav")
    tokenizer = Tokenizer()
    demos = site_data(0, [LEVEL], 40, root / "demos")
    cfg = VLNConfig.tiny(d_model=32, n_heads=2, n_cross_layers=2, vocab_size=len(tokenizer))
    teacher = VLNBackbone(cfg)
    data = demo_dataset(demos, tokenizer, cfg.max_len)
    fit(VLNMixable(teacher), data, make_objective(DistillConfig(method="none", epochs=3, lr=3e-3, batch_size=32,
                                                                device="cpu")), progress=False)
    save_backbone(teacher, tokenizer, root / "teacher.safetensors", card={"note": "test stand-in"})
    return root


def test_site_distills_a_navigation_student(nav_site):
    from kt_core.vln.checkpoint import load_backbone

    from participant.distiller import REPORT_FILE, STUDENT_FILE, run_distill

    (nav_site / "site.toml").write_text(f"""
[distill]
task = "nav"
teacher = "teacher.safetensors"
method = "mixkd"
epochs = 1
batch_size = 32
lr = 3e-3
device = "cpu"
out_dir = "out"

[distill.nav]
levels = ["{LEVEL}"]
episodes = 40
eval_episodes = 4
demo_cache = "{nav_site / 'demos'}"
""")
    report = run_distill(load_site_config(nav_site / "site.toml"), progress=False)
    for who in ("teacher", "student"):
        test = report[who]["test"]
        assert 0 <= test["success_rate"] <= 1 and 0 <= test["spl"] <= test["success_rate"] + 1e-9
        assert 0 <= test["action_accuracy"] <= 1
    assert report["compression"] > 1
    assert report["history"]["epochs"][0]["parts"].keys() == {"ce", "kd", "mix_kd", "mix_ce"}
    student = load_backbone(nav_site / "out" / STUDENT_FILE)
    assert student.config.d_model == 16 and student.config.n_cross_layers == 1
    assert json.loads((nav_site / "out" / REPORT_FILE).read_text())["student"]["sha256"] == report["student"]["sha256"]


def test_nav_teacher_checkpoint_of_another_kind(nav_site):
    from participant.distiller import run_distill

    (nav_site / "junk.safetensors").write_bytes(b"\x00" * 16)
    (nav_site / "bad.toml").write_text('[distill]\ntask = "nav"\nteacher = "junk.safetensors"\ndevice = "cpu"\n')
    with pytest.raises(CheckpointError, match="teacher checkpoint"):
        run_distill(load_site_config(nav_site / "bad.toml"), progress=False)
    (nav_site / "none.toml").write_text('[distill]\ntask = "nav"\nteacher = "missing.safetensors"\ndevice = "cpu"\n')
    with pytest.raises(CheckpointError, match="missing.safetensors does not exist"):
        run_distill(load_site_config(nav_site / "none.toml"), progress=False)
