"""The site's distiller end to end on tiny sizes, and every bad input it must refuse clearly."""
from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kt_core.distill import ddp
from kt_core.distill.bert import BertClassifier, BertConfig, StudentTooLargeError
from kt_core.distill.checkpoint import CheckpointError, save_checkpoint
from kt_core.distill.config import load_site_config
from kt_core.distill.device import DeviceError, capabilities, resolve_device
from kt_core.distill.loop import EmptyDatasetError, fit
from kt_core.config_file import ConfigError
from kt_core.distill.mixkd import DistillConfig, make_objective
from kt_core.distill.text import load_text_model, save_text_model
from participant.distiller import CURVES_FILE, REPORT_FILE, STUDENT_FILE, opacus_privatizer, run_distill

torch.set_num_threads(1)
LABELS = ("negative", "neutral", "positive")
TINY = BertConfig(vocab_size=30522, hidden=32, layers=2, heads=2, intermediate=64, max_positions=64, num_labels=3,
                  dropout=0.0)


def write_csv(path: Path, n: int = 90) -> Path:
    words = {"positive": "love great happy wonderful", "negative": "hate awful terrible crash",
             "neutral": "the car drives on the road"}
    rows = ["sentiment,confidence,text"]
    for i in range(n):
        label = LABELS[i % 3]
        w = words[label].split()
        rows.append(f"{label},1,\"{w[i % len(w)]} {w[(i + 1) % len(w)]} self driving cars {i}\"")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def site(tmp_path):
    """A tiny teacher checkpoint, a tiny labelled CSV and a site.toml that distills from them."""
    torch.manual_seed(0)
    teacher = BertClassifier(TINY)
    save_text_model(tmp_path / "teacher.safetensors", teacher, LABELS)
    write_csv(tmp_path / "tweets.csv")

    def config(extra: str = "", student: str = 'layers = 1\ninit = "teacher"\nvocab = 400', **top) -> Path:
        values = {"task": '"text"', "teacher": '"teacher.safetensors"', "method": '"mixkd"', "epochs": 1,
                  "batch_size": 16, "lr": 1e-3, "device": '"cpu"', "out_dir": '"out"', **top}
        text = "[distill]\n" + "\n".join(f"{k} = {v}" for k, v in values.items()) + "\n"
        text += f"\n[distill.student]\n{student}\n"
        text += '\n[distill.data]\ncsv = "tweets.csv"\nmax_len = 16\n' + extra
        path = tmp_path / "site.toml"
        path.write_text(text)
        return path

    return tmp_path, config


def test_distiller_writes_student_report_and_curves_only_under_out_dir(site, monkeypatch):
    root, config = site
    before = {p for p in root.rglob("*")}

    def no_network(*args, **kwargs):
        raise AssertionError("the distiller opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    report = run_distill(load_site_config(config()), progress=False)
    out = root / "out"
    created = {p for p in root.rglob("*")} - before - {root / "site.toml"}
    assert created and all(p == out or out in p.parents for p in created), sorted(map(str, created))
    for name in (STUDENT_FILE, REPORT_FILE, CURVES_FILE):
        assert (out / name).is_file()
    student, meta = load_text_model(out / STUDENT_FILE, what="student")
    assert student.config.layers == 1 and student.config.vocab_size == 400
    assert meta["extra"]["labels"] == list(LABELS) and meta["extra"]["method"] == "mixkd"
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["student"]["parameters"] < saved["teacher"]["parameters"] == report["teacher"]["parameters"]
    assert saved["history"]["epochs"][0]["parts"].keys() == {"ce", "kd", "mix_kd", "mix_ce"}
    assert len(saved["student"]["sha256"]) == 64 and "weight" not in json.dumps(saved["student"])
    assert (out / CURVES_FILE).read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_and_refuses_bad_config(site, capsys):
    from ktfed.distill_cmd import register

    root, config = site
    parser = argparse.ArgumentParser(prog="ktfed")
    sub = parser.add_subparsers(dest="command")
    part = sub.add_parser("participant").add_subparsers(dest="participant_command")
    register(part)
    args = parser.parse_args(["participant", "distill", "--config", str(config(method='"kd"')), "--no-progress"])
    assert args.func(args) == 0
    assert "student (kd)" in capsys.readouterr().out
    args = parser.parse_args(["participant", "distill", "--config", str(config(alpha=0))])
    assert args.func(args) == 2
    assert "distill.alpha: must be > 0" in capsys.readouterr().err


def test_missing_teacher_checkpoint(site):
    _, config = site
    with pytest.raises(CheckpointError, match="teacher checkpoint .*nowhere.safetensors does not exist"):
        run_distill(load_site_config(config(teacher='"nowhere.safetensors"')), progress=False)


def test_teacher_checkpoint_for_another_architecture(site):
    root, config = site
    other = torch.nn.Linear(4, 2)
    save_checkpoint(root / "vln.safetensors", other, kind="vln-backbone", config_json="{}")
    with pytest.raises(CheckpointError, match="is for architecture 'vln-backbone', expected 'text-classifier'"):
        run_distill(load_site_config(config(teacher='"vln.safetensors"')), progress=False)
    # a text checkpoint whose tensors are not what its config declares
    bigger = BertConfig(**{**TINY.__dict__, "hidden": 64, "heads": 4})
    save_checkpoint(root / "liar.safetensors", BertClassifier(TINY), kind="text-classifier", config_json=bigger.to_json())
    with pytest.raises(CheckpointError, match="does not match its declared text-classifier architecture"):
        run_distill(load_site_config(config(teacher='"liar.safetensors"')), progress=False)
    save_file({"x": torch.zeros(1)}, str(root / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a ktfed distillation checkpoint"):
        run_distill(load_site_config(config(teacher='"plain.safetensors"')), progress=False)
    (root / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        run_distill(load_site_config(config(teacher='"junk.safetensors"')), progress=False)


@pytest.mark.parametrize("student, words", [
    ('layers = 3\ninit = "teacher"', "student.layers: 3 > the teacher's 2"),
    ('layers = 1\nhidden = 64\ninit = "teacher"', "student.hidden: 64 > the teacher's 32"),
    ('layers = 2\ninit = "teacher"', "not fewer than the teacher's"),
])
def test_student_not_smaller_than_teacher_is_refused(site, student, words):
    _, config = site
    with pytest.raises(StudentTooLargeError, match=words):
        run_distill(load_site_config(config(student=student)), progress=False)


@pytest.mark.parametrize("top, extra, words", [
    ({"alpha": 0}, "", "distill.alpha: must be > 0"),
    ({"alpha": -0.5}, "", "distill.alpha: must be > 0"),
    ({"method": '"mix"'}, "", "distill.method: 'mix' is not one of"),
    ({"epochs": '"3"'}, "", "distill.epochs: expected an integer"),
    ({"data_fraction": 0}, "", "distill.data_fraction: must be in"),
    ({"device": '"tpu"'}, "", "distill.device: 'tpu' is not one of"),
    ({"colour": 1}, "", "distill.colour: unknown setting"),
    ({}, "\n[distill.dp]\nenabled = true\n", "distill.dp: DP-SGD with method \"mixkd\" is refused"),
    ({"teacher": '""'}, "", "distill.teacher: required"),
])
def test_bad_settings_name_the_field(site, top, extra, words):
    _, config = site
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_site_config(config(extra, **top))


def test_no_distill_section(tmp_path):
    (tmp_path / "site.toml").write_text("[other]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"distill: .* has no \[distill\] section"):
        load_site_config(tmp_path / "site.toml")


def test_empty_dataset_is_refused(site):
    root, config = site
    (root / "tweets.csv").write_text("sentiment,confidence,text\n")
    with pytest.raises(EmptyDatasetError, match="no labelled rows"):
        run_distill(load_site_config(config()), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(site):
    _, config = site
    with pytest.raises(DeviceError, match="'cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        run_distill(load_site_config(config(device='"cuda"')), progress=False)
    assert resolve_device("auto").type == "cpu"


def test_capabilities_are_a_plain_dict():
    caps = capabilities()
    assert json.loads(json.dumps(caps)) == caps
    assert caps["cpu_count"] >= 1 and caps["cuda_available"] == torch.cuda.is_available()
    assert caps["cuda_device_count"] == len(caps["cuda_devices"])


# -- DP-SGD under DDP (Opacus DPDDP), 2 gloo processes ------------------------------------------

def _dp_worker(out: str) -> None:
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    from tests.test_distill_ddp import Small, data

    torch.set_num_threads(1)
    ctx = ddp.DistContext.from_env()
    ddp.setup(ctx, "cpu")
    try:
        student = Small(seed=ctx.rank + 10)  # different on purpose: DPDDP broadcasts rank 0's weights
        cfg = DistillConfig(method="none", epochs=2, batch_size=8, lr=0.05, device="cpu")
        privatize = opacus_privatizer(noise_multiplier=1.0, max_grad_norm=1.0)
        fit(student, data(), make_objective(cfg), rank=ctx.rank, world_size=ctx.world_size, ddp_wrap=DPDDP,
            privatize=privatize, progress=False, bucket_by_length=False)
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, f"{out}.rank{ctx.rank}")
    finally:
        ddp.teardown()


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_dp_sgd_under_ddp_keeps_ranks_identical(tmp_path):
    import opacus.distributed  # noqa: F401 - imported once here, inherited by the forked ranks

    from tests.test_distill_ddp import Small

    ddp.spawn(_dp_worker, 2, args=(str(tmp_path / "dp"),), start_method="fork")
    r0, r1 = (load_file(str(tmp_path / f"dp.rank{r}")) for r in range(2))
    initial = Small(seed=10).state_dict()
    for name in r0:
        assert torch.isfinite(r0[name]).all()
        torch.testing.assert_close(r0[name], r1[name])  # rank 0's noise, all-reduced: one model
    assert any(not torch.equal(r0[n], initial[n]) for n in r0)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_text_distillation_with_dp_sgd(site):
    _, config = site
    cfg = load_site_config(config("\n[distill.dp]\nenabled = true\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n",
                                  method='"kd"'))
    report = run_distill(cfg, progress=False)
    assert report["epsilon"]["epsilon"] > 0 and report["epsilon"]["delta"] <= 1e-5
    assert report["history"]["epochs"][0]["parts"].keys() == {"ce", "kd"}


@pytest.mark.slow
def test_cli_nproc_two_runs_ddp_processes(site):
    """`--nproc 2` spawns two gloo processes (as torchrun would); rank 0 writes the report."""
    import subprocess
    import sys

    root, config = site
    path = config(method='"kd"')
    code = ("import sys, argparse\nfrom ktfed.distill_cmd import register\n"
            "p = argparse.ArgumentParser(); s = p.add_subparsers(); register(s)\n"
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")
    out = subprocess.run([sys.executable, "-c", code, "distill", "--config", str(path), "--nproc", "2", "--json"],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((root / "out" / REPORT_FILE).read_text())
    assert report["world_size"] == 2 and report["history"]["world_size"] == 2
