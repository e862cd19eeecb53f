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
from kt_core.tasks import load_adapted, state_digest_of
from participant.trainer import LocalTrainer


def _trained(tmp_path, site: str = "site-a", steps: int = 20, folder: str = "") -> LocalTrainer:
    config = load_toml(fast_config(sites=["site-a", "site-b"], epochs=1)).resolved()
    trainer = LocalTrainer(site, "run-1", config, tmp_path / (folder or site))
    trainer.train(epochs=50, batch_size=32, lr=0.05, max_steps=steps, seed=1, round_no=1, attempt_id="a1")
    return trainer


def _state(trainer: LocalTrainer) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in shared_state(trainer.model).items()}


def _evaluation(folder) -> dict:
    return json.loads((folder / "evaluation-run-1.json").read_text())


def test_a_site_keeps_the_final_aggregate_where_it_does_better_on_its_validation_part(tmp_path):
    trainer = _trained(tmp_path, steps=5)
    assert trainer.data.validation is not None and len(trainer.data.validation) >= 20
    final = _state(_trained(tmp_path, steps=300, folder="longer"))   # a far better global state
    path = trainer.conclude(tmp_path / "site-a", ("d" * 64, final), round_no=1, reason="done")
    evaluation = _evaluation(tmp_path / "site-a")
    assert evaluation["model"] == "final global state + private factors" == evaluation["choice"]["kept"]
    assert evaluation["global_state_digest"] == "d" * 64
    scores = evaluation["choice"]["validation_accuracy"]
    assert scores["final_aggregate"] >= scores["last_local_model"]
    # what is scored and written is the model the site now holds: the final state + its private factors
    assert all(np.array_equal(t.detach().numpy(), final[n]) for n, t in shared_state(trainer.model).items())
    assert evaluation["test_accuracy"] == pytest.approx(trainer.evaluate()["accuracy"])
    adapted = load_adapted(path)
    assert adapted.meta["kept"] == "final global state + private factors"
    assert state_digest_of(shared_state(adapted.model)) == state_digest_of(shared_state(trainer.model))


def test_a_site_keeps_its_last_local_model_where_the_aggregate_does_worse_on_its_validation_part(tmp_path):
    trainer = _trained(tmp_path, steps=300)
    last_local = _state(trainer)
    final = _state(_trained(tmp_path, "site-b", steps=5))   # another site's barely trained factors
    path = trainer.conclude(tmp_path / "site-a", ("e" * 64, final), round_no=1, reason="done")
    evaluation = _evaluation(tmp_path / "site-a")
    scores = evaluation["choice"]["validation_accuracy"]
    assert evaluation["model"] == "last local model" and scores["last_local_model"] > scores["final_aggregate"]
    assert all(np.array_equal(t.detach().numpy(), last_local[n]) for n, t in shared_state(trainer.model).items())
    assert evaluation["test_accuracy"] == pytest.approx(trainer.evaluate()["accuracy"])
    adapted = load_adapted(path)
    assert adapted.meta["kept"] == "last local model" and adapted.global_state_digest == "e" * 64


def test_the_validation_part_is_held_back_from_training_the_same_way_every_time():
    from kt_core.image_task import MIN_VALIDATION, held_back

    train, val = held_back(500, "site-a", 7)
    assert len(val) == 50 and len(train) == 450 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(500))
    again, val_again = held_back(500, "site-a", 7)
    assert np.array_equal(train, again) and np.array_equal(val, val_again)
    assert not np.array_equal(val, held_back(500, "site-b", 7)[1])   # each site draws its own
    small, none = held_back(10 * MIN_VALIDATION - 1, "site-a", 7)
    assert none is None and len(small) == 10 * MIN_VALIDATION - 1   # too few to choose by: all train


def test_without_the_final_state_the_evaluation_says_it_scored_the_last_local_model(tmp_path):
    trainer = _trained(tmp_path)
    last_local = trainer.evaluate()["accuracy"]
    assert trainer.conclude(tmp_path / "site-a", None, round_no=1, reason="done") is None
    evaluation = _evaluation(tmp_path / "site-a")
    assert evaluation["model"].startswith("last local model") and "choice" not in evaluation
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
