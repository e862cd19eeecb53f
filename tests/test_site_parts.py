"""The site's parts on their own: the task interface, the site's privacy engine, its audit trail."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kt_core import tasks
from kt_core.config import TASK_KINDS, ConfigError, load_toml
from kt_core.task_api import FederatedTask
from kt_core.task_runner import TaskRunner
from kt_core.wire import federation_pb2 as pb
from kt_core.wire.transport import TLSFiles
from participant.audit_trail import NoAudit, SiteAudit
from participant.privacy import SitePrivacy
from security.audit.reader import read_raw
from security.pki import issue
from tests.conftest import fast_config
from tests.test_audit_log import make_audit_pki


def _config(extra: str = "", sites=("site-a", "site-b")):
    return load_toml(fast_config(sites=list(sites), extra=extra)).resolved()


def test_every_task_kind_resolves_to_its_task_and_an_unknown_one_is_named():
    config = _config()
    for kind in TASK_KINDS:
        entry = "tests.test_task_api:TinyTask" if kind == "python" else ""   # a federation's own task is named
        task = tasks.task_for(dataclasses.replace(config, task=dataclasses.replace(config.task, kind=kind, entry=entry,
                                                                                   version="")))
        # the built-in tasks are FederatedTasks, run by the same runner as a federation's own
        assert isinstance(task, TaskRunner) and task.kind == kind and isinstance(task.task, FederatedTask)
    bogus = dataclasses.replace(config, task=dataclasses.replace(config.task, kind="speech"))
    with pytest.raises(ConfigError, match="task.kind: 'speech'"):
        tasks.task_for(bogus)


def test_the_image_task_builds_trains_and_evaluates_a_sites_share(tmp_path):
    task = tasks.task_for(_config())
    built = task.build()
    data = task.site_data(built, "site-a", data_root=None, state_dir=tmp_path)
    assert data.num_samples == len(data.train) > 0 and data.levels == ()
    from kt_core.train import TrainConfig

    result = task.train(built.model, data, TrainConfig(epochs=1, batch_size=32, max_steps=3))
    assert result.steps == 3 and np.isfinite(result.loss)
    assert set(task.evaluate(built.model, data)) >= {"accuracy", "loss"}
    assert task.final_evaluation(built, data) == {} and task.report_final({"site-a": {}}) == []


def test_record_level_dp_is_refused_for_a_task_that_does_not_offer_it():
    config = _config("[privacy]\nenabled = true\nnoise_multiplier = 1.0\nepsilon_budget = 5.0\n")
    nav = dataclasses.replace(config, task=dataclasses.replace(config.task, kind="vln"))
    with pytest.raises(ValueError, match="record-level DP-SGD is not offered for the vln task"):
        SitePrivacy.check_offered(nav, tasks.task_for(nav))
    SitePrivacy.check_offered(config, tasks.task_for(config))   # the image task offers it


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e3), clip=st.floats(0.05, 5.0))
def test_user_level_dp_clips_the_whole_update_to_the_clip_norm(scale, clip):
    config = _config(f"[privacy]\nenabled = true\nmechanism = \"central\"\nupdate_clip_norm = {clip}\n"
                     "user_noise_multiplier = 1.0\n")
    privacy = SitePrivacy("site-a", "r", config, tasks.task_for(config), state_dir=".", num_samples=10,
                          model=None)
    update = {"a": np.full((3, 4), scale, np.float32), "b": np.full(5, -scale, np.float32)}
    out = privacy.protect_update(update)
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values()))
    before = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))
    assert norm == pytest.approx(min(before, clip), rel=1e-5)
    assert privacy.metrics() == {} and privacy.budget is None


def test_without_privacy_the_update_leaves_as_it_is():
    config = _config()
    privacy = SitePrivacy("site-a", "r", config, tasks.task_for(config), state_dir=".", num_samples=10, model=None)
    update = {"a": np.arange(6, dtype=np.float32)}
    assert privacy.protect_update(update) is update


def _entries(folder) -> list[dict]:
    return [json.loads(line) for line in read_raw(folder).lines]


def test_the_audit_trail_reopens_signed_by_a_rotated_certificate(tmp_path):
    pki = make_audit_pki(tmp_path / "pki", names=("site-a",))
    audit = SiteAudit(tmp_path / "audit", "site-a", TLSFiles.from_pki(pki, "site-a"), "coordinator")
    audit.rotate_if_needed()                                 # nothing changed: the same log goes on
    seq = audit.boundary("run-1", "receive", 1, "assignment", "00" * 32)
    issue(pki, "site-a", "participant")                      # the operator rotates the site's certificate
    audit.rotate_if_needed()
    assert audit.boundary("run-1", "send", 1, "update", "11" * 32) > seq
    audit.close("finished")
    entries = _entries(tmp_path / "audit")
    assert [e["kind"] for e in entries] == ["open", "boundary", "close", "resume", "boundary", "close"]
    opened, resumed = entries[0]["body"], entries[3]["body"]
    assert resumed.get("certificate") and resumed["certificate"] != opened["certificate"]


def test_no_audit_records_nothing_and_countersigns_nothing():
    audit = NoAudit()
    assert audit.boundary("r", "send", 1, "update", "00") is None
    assert audit.countersign("r", pb.RoundAssignment(audit_head_hash="ab")) == (b"", None)


@pytest.mark.parametrize("physical", [0, 2])
def test_dp_sgd_without_poisson_sampling_takes_every_record_once_per_epoch(physical):
    """The acknowledged non-Poisson path: each epoch a secret shuffle (not the run's seed's), cut
    into the loop's batches, and physical batches within them."""
    import torch
    import torch.nn.functional as F

    from security.dp.engine import DPSettings, train_dp

    n, seen = 10, []
    x, y = torch.randn(n, 4), torch.arange(n)

    def loss_fn(out, labels):
        seen.extend(labels.tolist())
        return F.cross_entropy(out, labels)

    model = torch.nn.Linear(4, n)
    result = train_dp(model, x, y, loss_fn=loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      settings=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=3, epochs=2,
                                          poisson=False, max_physical_batch_size=physical))
    assert result.steps == 2 * 4                                   # ceil(10 / 3) steps per epoch
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))
    assert not hasattr(model.weight, "grad_sample")


class _Refusals(NoAudit):
    def __init__(self):
        self.refusals = []

    def refusal(self, run, round_no, message, reason, detail):
        self.refusals.append((message, reason, detail))


@pytest.mark.parametrize("text, named", [
    ("{not json", "run config JSON"),
    (json.dumps({"federation": {"rounds": 0}}), "federation.rounds"),
    (json.dumps({"warp_drive": {}}), "warp_drive"),
])
def test_a_run_config_the_site_cannot_read_refuses_the_run_instead_of_stopping_the_site(tmp_path, text, named):
    import threading

    from participant.site_run import AgentSettings, GlobalStates, SiteCounters, SiteRun

    settings = AgentSettings("site-a", "127.0.0.1:1", None, tmp_path)
    audit, counters = _Refusals(), SiteCounters()
    reply = pb.JoinReply(header=pb.Header(run_id="run-1", round=1), run_config_json=text)
    run = SiteRun.join(settings, None, reply, audit=audit, states=GlobalStates(settings, audit, counters),
                       counters=counters, stopping=threading.Event())
    assert run.trainer is None and run.run_id == "run-1"
    (refused,) = run.refused
    assert str(refused).startswith("run unworkable: run config: ") and named in str(refused)
    assert audit.refusals == [("join", "run unworkable", refused.detail)]
