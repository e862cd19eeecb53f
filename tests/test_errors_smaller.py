"""The smaller operating items of issue 20: file modes, what a redirected stderr receives, the
pretraining plot's legend, the simulation's sites and paths."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from tests.conftest import fast_config

REPO = Path(__file__).resolve().parent.parent


def test_a_distilled_student_is_written_0600(tmp_path):
    from kt_core.distill.checkpoint import save_checkpoint

    old = os.umask(0o022)  # the usual umask, under which the file came out 0644
    try:
        path = save_checkpoint(tmp_path / "student.safetensors", nn.Linear(3, 2), kind="test", config_json="{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_loss_plot_legend_says_what_stdout_says(tmp_path):
    pytest.importorskip("matplotlib")
    from kt_core.vln.pretrain import final_loss, plot_losses

    rng = np.random.default_rng(0)
    history = {"mlm": list(3 * np.exp(-np.arange(400) / 80) + rng.random(400)),
               "action": list(2 * np.exp(-np.arange(400) / 50) + rng.random(400))}
    labels = plot_losses(history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    # ktfed pretrain prints card["losses"]["final_*"] = final_loss(history[...]) with 3 decimals
    assert labels == [f"masked language modelling (final {final_loss(history['mlm']):.3f})",
                      f"action prediction (final {final_loss(history['action']):.3f})"]
    assert final_loss(history["mlm"]) == pytest.approx(np.mean(history["mlm"][-20:]))


@pytest.mark.slow
def test_simulate_says_when_it_replaces_the_configs_sites_and_prints_absolute_paths(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(fast_config(rounds=1, sites=["site-a", "site-b"], epochs=1))
    done = subprocess.run([sys.executable, "-m", "ktfed", "simulate", "--participants", "3", "--config", str(config),
                           "--out", "sim"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "lists 2 site(s) in federation.sites; simulating 3 virtual sites site-000" in done.stderr
    assert f"state in {tmp_path / 'sim'}" in done.stdout
    state = next(line for line in done.stdout.splitlines() if line.startswith("global state: "))
    path = Path(state.removeprefix("global state: ").split(";", 1)[0])
    assert path.is_absolute() and path.is_file()


def test_the_benchmarks_run_from_any_folder(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench"), "--quick", "bytes", "--out", str(tmp_path / "r")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    assert (tmp_path / "r" / "bytes.json").is_file()
