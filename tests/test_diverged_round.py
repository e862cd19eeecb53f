"""A round whose local training diverges (the loss goes to inf or NaN): the site sends nothing for
it, its private tensors go back to where the run started them (not to before the round: that
state may be what diverges), its optimizer starts afresh, and under DP-SGD the round's noisy steps
count as spent, and DP-SGD's per-sample machinery leaves nothing behind for the next round (the
diverged step's activations did, and broke it). Found on a quantity-skewed split where a 3-record site under record-level DP at
epsilon 8 diverged in round 4 and, before this, took its participant down."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from kt_core.config import load_toml
from kt_core.models import private_state, shared_state
from participant.trainer import LocalTrainer, TrainingDiverged
from security.dp.engine import plan_round
from tests.conftest import fast_config

DP = "[privacy]\nenabled = true\nnoise_multiplier = 1.1\nepsilon_budget = 50.0\nmax_grad_norm = 1.0\ndelta = 1e-5\n"


def _arrays(tensors) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in tensors.items()}


def _trainer(tmp_path, extra: str = "") -> LocalTrainer:
    config = load_toml(fast_config(sites=["site-a", "site-b"], epochs=1, extra=extra)).resolved()
    trainer = LocalTrainer("site-a", "run-1", config, tmp_path)
    trainer.train(epochs=1, batch_size=32, lr=0.05, max_steps=5, seed=1, round_no=1, attempt_id="a1")
    trainer.save_private()
    return trainer


@pytest.mark.parametrize("extra", ["", DP], ids=["plain", "dp_sgd"])
def test_a_diverged_round_sends_nothing_and_puts_the_private_factors_back_to_the_runs_start(tmp_path, extra):
    trainer = _trainer(tmp_path, extra)
    initial = _arrays(trainer.initial_private)
    assert any(not np.array_equal(a, initial[n]) for n, a in _arrays(private_state(trainer.model)).items())
    shared_before = _arrays(shared_state(trainer.model))
    with pytest.raises(TrainingDiverged, match="round 2: training loss became"):
        trainer.train(epochs=1, batch_size=32, lr=1e30, max_steps=20, seed=2, round_no=2, attempt_id="a2")
    for name, value in _arrays(private_state(trainer.model)).items():
        np.testing.assert_array_equal(value, initial[name])
    for name, value in _arrays(shared_state(trainer.model)).items():
        np.testing.assert_array_equal(value, shared_before[name])
    on_disk = load_file(str(trainer.private_path))
    assert all(np.array_equal(on_disk[n], initial[n]) for n in initial)
    assert not trainer.optimizer_path.exists()
    # the next round trains from there
    result = trainer.train(epochs=1, batch_size=32, lr=0.05, max_steps=5, seed=3, round_no=3, attempt_id="a3")
    assert np.isfinite(result.loss)


def test_under_dp_sgd_a_diverged_round_counts_as_spent(tmp_path):
    trainer = _trainer(tmp_path, DP)
    with pytest.raises(TrainingDiverged):
        trainer.train(epochs=1, batch_size=32, lr=1e30, max_steps=20, seed=2, round_no=2, attempt_id="a2")
    rows = {e.round: e for e in trainer.ledger.entries()}
    reserved = plan_round(trainer.num_samples, 32, 1, 20).steps
    assert rows[2].state == "spent" and rows[2].steps == reserved    # the noisy steps ran
