"""What a site keeps at the end of a run is what gets scored: the final global state with its private
factors, on its own test split, beside the task's final evaluation; the demo reports that score,
not the last round's local training."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import fast_config
from kt_core.config import load_toml
from kt_core.models import shared_state
from participant.trainer import LocalTrainer


def _trained(tmp_path, site: str = "site-a") -> LocalTrainer:
    config = load_toml(fast_config(sites=["site-a", "site-b"], epochs=1)).resolved()
    trainer = LocalTrainer(site, "run-1", config, tmp_path / site)
    trainer.train(epochs=1, batch_size=32, lr=0.05, max_steps=20, seed=1, round_no=1, attempt_id="a1")
    return trainer


def test_the_final_evaluation_scores_the_model_the_site_keeps_on_its_test_split(tmp_path):
    trainer = _trained(tmp_path)
    last_local = trainer.evaluate()["accuracy"]
    # a final global state unlike the site's own: another site's shared factors
    other = _trained(tmp_path, "site-b")
    final = {n: t.detach().numpy().copy() for n, t in shared_state(other.model).items()}
    path = trainer.conclude(tmp_path / "site-a", ("d" * 64, final), round_no=1, reason="done")
    evaluation = json.loads((tmp_path / "site-a" / "evaluation-run-1.json").read_text())
    kept = trainer.evaluate()["accuracy"]   # the model now holds the final state + its private factors
    assert path is not None and path.is_file()
    assert evaluation["model"] == "final global state + private factors"
    assert evaluation["global_state_digest"] == "d" * 64
    assert evaluation["test_accuracy"] == pytest.approx(kept)
    assert all(np.array_equal(t.detach().numpy(), final[n]) for n, t in shared_state(trainer.model).items())
    assert kept != pytest.approx(last_local, abs=1e-9)   # it is not the last local model's score


def test_without_the_final_state_the_evaluation_says_it_scored_the_last_local_model(tmp_path):
    trainer = _trained(tmp_path)
    last_local = trainer.evaluate()["accuracy"]
    assert trainer.conclude(tmp_path / "site-a", None, round_no=1, reason="done") is None
    evaluation = json.loads((tmp_path / "site-a" / "evaluation-run-1.json").read_text())
    assert evaluation["model"].startswith("last local model")
    assert evaluation["test_accuracy"] == pytest.approx(last_local)


def test_the_demo_reports_the_kept_models_accuracy_where_a_site_wrote_one():
    from ktfed.report import RoundTable, kept_model_accuracy

    table = RoundTable(["site-a", "site-b", "site-c"])
    table.accuracy = {"site-a": [(0, 0.1), (5, 0.8)], "site-b": [(0, 0.2), (5, 0.7)], "site-c": []}
    evaluations = {"site-a": {"test_accuracy": 0.6}, "site-b": {"test_accuracy": "0.9"},   # not a number
                   "site-c": {"test_accuracy": 0.5}}
    # site-a: its kept model; site-b: the last round (no usable score); site-c: no rounds, its score
    assert kept_model_accuracy(table, evaluations) == {"site-a": 0.6, "site-b": 0.7, "site-c": 0.5}


def test_a_navigation_site_without_rollouts_still_describes_its_test_split_score():
    import dataclasses

    from kt_core import tasks

    config = load_toml(fast_config(sites=["site-a", "site-b"], epochs=1)).resolved()
    nav = tasks.task_for(dataclasses.replace(config, task=dataclasses.replace(config.task, kind="vln")))
    assert "test_accuracy" in nav.describe_final({"test_accuracy": 0.5})
    assert nav.report_final({"site-a": {"test_accuracy": 0.5}}) == []   # no rollout lines to print
