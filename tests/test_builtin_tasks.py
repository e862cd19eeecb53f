"""The built-in tasks run through the same task API as a federation's own, pinned the same way,
and a coordinator whose installed task changed under an unfinished run refuses to resume it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kt_core import tasks
from kt_core.config import ConfigError, load_toml
from kt_core.image_task import ImageTask
from kt_core.nav_task import NavTask
from kt_core.python_task import TaskMismatch
from kt_core.task_api import FederatedTask
from kt_core.task_runner import TaskRunner, batch_of
from kt_core.train import TrainConfig, train_local
from tests.conftest import fast_config


def _image_config():
    return load_toml(fast_config(sites=["site-a", "site-b"])).resolved()


def test_the_built_in_tasks_are_federated_tasks():
    assert issubclass(ImageTask, FederatedTask) and issubclass(NavTask, FederatedTask)
    assert ImageTask.loss_is_default() and not NavTask.loss_is_default()   # DP-SGD per record: image only
    assert NavTask.hosts_backbone and not NavTask.reads_site_data and not ImageTask.reads_site_data


def test_the_image_task_through_the_runner_trains_exactly_as_the_plain_loop(tmp_path):
    """The runner's batches of a TensorDataset are the plain loop's x[idx], y[idx]: same weights."""
    config = _image_config()
    runner = tasks.task_for(config)
    built = runner.build()
    data = runner.site_data(built, "site-a", data_root=None, state_dir=tmp_path)
    reference = tasks.build(config).model
    reference.load_state_dict(built.model.state_dict())
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=3)
    ours = runner.train(built.model, data, cfg)
    x, y = data.train.tensors
    theirs = train_local(reference, x, y, cfg)
    assert ours.steps == theirs.steps > 0 and ours.loss == pytest.approx(theirs.loss, rel=1e-6)
    for (name, a), (_, b) in zip(built.model.state_dict().items(), reference.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert runner.dp_records(data)[0] is x   # DP-SGD gets the site's tensors themselves, not a copy


def test_a_built_in_task_is_pinned_to_its_version_and_another_release_refuses():
    config = _image_config()
    assert config.task.version == ImageTask.version   # the coordinator pins it as the run starts
    older = dataclasses.replace(config, task=dataclasses.replace(config.task, version="0"))
    with pytest.raises(TaskMismatch, match=r"task.version: the run announces kt_core.image_task:ImageTask version '0'"):
        tasks.task_for(older)
    # the other pins are a python task's: a built-in task's options are the run config, which travels whole
    with pytest.raises(ConfigError, match='options_sha256: only for kind "python"'):
        load_toml(fast_config(sites=["a", "b"], extra='[task]\noptions_sha256 = "' + "0" * 64 + '"\n'))


def test_batches_take_each_form_the_api_names():
    tensors = torch.utils.data.TensorDataset(torch.arange(10.0).reshape(5, 2), torch.arange(5))
    x, y = batch_of(tensors, torch.tensor([4, 0]))
    assert x.tolist() == [[8.0, 9.0], [0.0, 1.0]] and y.tolist() == [4, 0]

    class Rows:   # any object with batch(indices)
        def __len__(self):
            return 3

        def batch(self, idx):
            return {"i": idx * 10}

    assert batch_of(Rows(), torch.tensor([1, 2]))["i"].tolist() == [10, 20]
    items = [(torch.tensor([float(i)]), i) for i in range(4)]   # a plain map-style list: default_collate
    xs, ys = batch_of(items, torch.tensor([3, 1]))
    assert xs.tolist() == [[3.0], [1.0]] and ys.tolist() == [3, 1]


def _python_run(tmp_path):
    from coordinator.coordinator import Coordinator
    from coordinator.store import Store
    from tests.test_task_api import config

    coord = Coordinator(Store(tmp_path))
    run_id = coord.start_run(config())
    coord.stop("shutdown")
    coord.store.close()
    return run_id


def test_a_coordinator_whose_task_version_changed_refuses_to_resume_until_told_to_abandon(tmp_path, monkeypatch):
    from coordinator.coordinator import Coordinator, ResumeRefused
    from coordinator.store import Store
    from tests.test_task_api import TinyTask

    run_id = _python_run(tmp_path)
    monkeypatch.setattr(TinyTask, "version", "2.0")   # the operator installed another release of the task
    again = Coordinator(Store(tmp_path))
    try:
        with pytest.raises(ResumeRefused, match=rf"cannot resume run {run_id}: task.version: .*version '1.0'.*"
                                                rf"--abandon-run {run_id}"):
            again.resume()
        assert again.engine is None and again.store.active_run().run_id == run_id   # nothing changed
        with pytest.raises(ValueError, match=rf"--abandon-run 'run-000000000000': the unfinished run is {run_id}"):
            again.resume(abandon="run-000000000000")
        assert again.store.active_run().run_id == run_id
        assert again.resume(abandon=run_id) is False
        assert again.store.active_run() is None and again.store.run(run_id).state == "stopped"
    finally:
        again.store.close()
    fresh = Coordinator(Store(tmp_path))
    try:
        assert fresh.resume() is False   # the abandoned run stays stopped
    finally:
        fresh.store.close()


def test_abandon_run_takes_only_a_run_id():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ktfed", "coordinator", "serve", "--abandon-run", "../etc"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--abandon-run: not a run id" in out.stderr
