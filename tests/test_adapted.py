"""A site's adapted model after a run (kt_core.tasks.save_adapted / load_adapted): the file holds
the shared and private adapter tensors with the run config and provenance; loading rebuilds the
model on the frozen backbone found by digest and refuses anything that does not fit."""
from __future__ import annotations

import dataclasses
import json
import shutil
import stat
from pathlib import Path

import pytest
import torch

from kt_core import tasks
from kt_core.config import load_toml
from kt_core.models import private_state, shared_state
from kt_core.tasks import AdaptedModelError, load_adapted, save_adapted, state_digest_of

torch.set_num_threads(1)
SITE_LEVEL = "BabyAI-GoToLocal-v0"
RUN_ID = "run-test"


def run_config_text(backbone: Path, episodes: int = 40, n_factors: int = 4) -> str:
    return f"""
[federation]
rounds = 2
min_sites = 3
sites = ["site-a", "site-b", "site-c"]

[task]
kind = "vln"

[vln]
backbone = "{backbone}"
levels = ["{SITE_LEVEL}", "BabyAI-GoToObj-v0", "BabyAI-GoToRedBlueBall-v0"]
held_out_levels = ["BabyAI-GoToObjDoor-v0"]
episodes_per_level = {episodes}
eval_episodes = 3
rollout_episodes = 4

[vln.adapter]
adapter = "waffle"
n_factors = {n_factors}
"""


def save_tiny_backbone(path: Path, seed: int = 0) -> str:
    from kt_core.vln.backbone import VLNBackbone, VLNConfig
    from kt_core.vln.checkpoint import save_backbone
    from kt_core.vln.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    cfg = VLNConfig.tiny(d_model=32, n_heads=2, n_cross_layers=2, vocab_size=len(tokenizer), seed=seed)
    return save_backbone(VLNBackbone(cfg), tokenizer, path)["checkpoint"]["sha256"]


def make_adapted_site(root: Path, *, train_steps: int = 30, episodes: int = 40) -> Path:
    """What a site's state dir holds after a run, without the run: the backbone in its cache and
    STATE/adapted-<run>.safetensors of site-a (site index 0, level GoToLocal), its adapters trained
    here by behaviour cloning on its demonstrations. Returns the state dir."""
    from kt_core.vln import finetune

    hosted = root / "hosted" / "backbone.safetensors"
    sha = save_tiny_backbone(hosted)
    state = root / "site-a"
    (state / "backbones").mkdir(parents=True)
    shutil.copy(hosted, state / "backbones" / f"{sha}.safetensors")
    config = tasks.with_backbone_digest(load_toml(run_config_text(hosted, episodes)), sha)
    built = tasks.build(config, hosted)
    demos = finetune.site_data(0, [SITE_LEVEL], episodes, root / "demos")
    data = finetune.encode_demos(demos, built.tokenizer, built.model.cfg.max_len, built.model.cfg.memory)
    cfg = dataclasses.replace(config.train, epochs=50, batch_size=32, lr=3e-3, max_steps=train_steps, seed=0)
    finetune.train_local(built.model, data, cfg)
    save_adapted(tasks.adapted_path(state, RUN_ID), built.model, config, site="site-a", levels=[SITE_LEVEL],
                 run_id=RUN_ID, round_no=2, global_state_digest=state_digest_of(shared_state(built.model)))
    return state


@pytest.fixture(scope="module")
def site_state(tmp_path_factory) -> Path:
    return make_adapted_site(tmp_path_factory.mktemp("adapted"), train_steps=5, episodes=10)


def adapted_file(state: Path) -> Path:
    return tasks.adapted_path(state, RUN_ID)


def rewrite(src: Path, dst: Path, *, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of an adapted file with some metadata or tensors replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        old_meta = dict(f.metadata())
        old = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors if tensors is not None else old, str(dst), metadata={**old_meta, **(meta or {})})
    return dst


def test_round_trip_rebuilds_the_sites_model(site_state):
    path = adapted_file(site_state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_adapted(path)   # the backbone from STATE/backbones by its digest
    assert (loaded.site, loaded.site_index, loaded.levels, loaded.run_id, loaded.round) == \
        ("site-a", 0, (SITE_LEVEL,), RUN_ID, 2)
    assert loaded.backbone_path.parent == site_state / "backbones" and not loaded.model.training
    assert state_digest_of(shared_state(loaded.model)) == loaded.global_state_digest
    assert loaded.backbone_parameters == sum(p.numel() for p in _plain_backbone(loaded).parameters())
    # the private factor selection is the site's, as written
    from safetensors.torch import load_file

    raw = load_file(str(path))
    priv = private_state(loaded.model)
    assert priv and all(torch.equal(raw[n], t) for n, t in priv.items())
    # a cache folder or the file itself name the backbone too
    assert load_adapted(path, site_state / "backbones").backbone_sha256 == loaded.backbone_sha256
    assert load_adapted(path, loaded.backbone_path).sha256 == loaded.sha256


def _plain_backbone(loaded):
    from kt_core.vln.checkpoint import load_backbone

    return load_backbone(loaded.backbone_path, sha256=loaded.backbone_sha256).model


def test_missing_file(site_state, tmp_path):
    with pytest.raises(AdaptedModelError, match="missing.safetensors: file not found"):
        load_adapted(tmp_path / "missing.safetensors")


def test_wrong_backbone_is_refused(site_state, tmp_path):
    other = tmp_path / "other.safetensors"
    save_tiny_backbone(other, seed=1)   # same architecture, other weights
    with pytest.raises(AdaptedModelError, match="backbone digest mismatch: it was adapted from backbone"):
        load_adapted(adapted_file(site_state), other)
    with pytest.raises(AdaptedModelError, match="not found .name the backbone file or the site's backbone cache"):
        load_adapted(adapted_file(site_state), tmp_path)   # a cache folder without it
    moved = rewrite(adapted_file(site_state), tmp_path / "adapted.safetensors")
    with pytest.raises(AdaptedModelError, match="backbones/.*not found"):
        load_adapted(moved)   # no STATE/backbones beside it


def test_file_for_another_config_is_refused(site_state, tmp_path):
    src = adapted_file(site_state)
    meta = load_adapted(src).meta
    # the same tensors under a config whose adapters have 8 factors, not 4
    table = json.loads(meta["run_config"])
    table["vln"]["adapter"]["n_factors"] = 8
    bad = rewrite(src, tmp_path / "factors.safetensors", meta={"run_config": json.dumps(table)})
    shutil.copytree(site_state / "backbones", tmp_path / "backbones")
    with pytest.raises(AdaptedModelError, match="tensors do not match the model its config builds: tensor .*shape"):
        load_adapted(bad)
    # adapters on other layers: other tensor names
    table["vln"]["adapter"].update(n_factors=4, targets=["cross_layers.*.lang_cross.*"])
    bad = rewrite(src, tmp_path / "targets.safetensors", meta={"run_config": json.dumps(table)})
    with pytest.raises(AdaptedModelError, match="tensors do not match the model its config builds: unexpected"):
        load_adapted(bad)
    # a config naming another backbone than the metadata
    table["vln"]["adapter"]["targets"] = ["cross_layers.*"]
    table["vln"]["backbone_sha256"] = "0" * 64
    bad = rewrite(src, tmp_path / "sha.safetensors", meta={"run_config": json.dumps(table)})
    with pytest.raises(AdaptedModelError, match="backbone_sha256 .* is not the run config's"):
        load_adapted(bad)
    # a site that is not in the run
    bad = rewrite(src, tmp_path / "site.safetensors", meta={"site": "site-z"})
    with pytest.raises(AdaptedModelError, match="metadata disagrees with its run config"):
        load_adapted(bad)


def test_corrupted_file_is_refused(site_state, tmp_path):
    src = adapted_file(site_state)
    shutil.copytree(site_state / "backbones", tmp_path / "backbones")
    data = src.read_bytes()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    (tmp_path / "short.safetensors").write_bytes(data[:len(data) // 2])
    for name in ("junk", "short"):
        with pytest.raises(AdaptedModelError, match="not a readable safetensors file"):
            load_adapted(tmp_path / f"{name}.safetensors")
    flipped = bytearray(data)
    flipped[-3] ^= 0x40   # inside the last tensor's data: still a valid safetensors file
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(AdaptedModelError, match="do not match the digests recorded when it was written"):
        load_adapted(tmp_path / "flipped.safetensors")
    with pytest.raises(AdaptedModelError, match=r"metadata field\(s\) \['levels'\] missing"):
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(src), framework="pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != "levels"}
            save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "nolevels.safetensors"), metadata=meta)
        load_adapted(tmp_path / "nolevels.safetensors")
    bad = rewrite(src, tmp_path / "format.safetensors", meta={"format": "ktfed-vln-backbone/1"})
    with pytest.raises(AdaptedModelError, match="format 'ktfed-vln-backbone/1', expected 'ktfed-adapted-model/1'"):
        load_adapted(bad)


def test_image_task_round_trip(tmp_path):
    """The image task writes the same file (no backbone): the loader needs nothing else."""
    from tests.conftest import fast_config

    config = load_toml(fast_config())
    model = tasks.build(config).model
    path = tmp_path / "adapted-x.safetensors"
    save_adapted(path, model, config, site="site-b", levels=[], run_id="x", round_no=3,
                 global_state_digest=state_digest_of(shared_state(model)))
    loaded = load_adapted(path)
    assert loaded.backbone_path is None and loaded.levels == () and loaded.site_index == 1
    x = torch.randn(4, config.model.input_dim)
    model.eval()
    torch.testing.assert_close(loaded.model(x), model(x))


def test_agent_without_the_final_state_writes_no_adapted_model(tmp_path, caplog):
    """A coordinator that does not serve the final state (e.g. one without the empty-digest
    download): the site keeps its private factors and evaluates, but writes no adapted file,
    since its last local model is not the federation's."""
    import grpc

    from kt_core.wire import federation_pb2 as pb
    from participant.agent import AgentSettings, ParticipantAgent

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.FAILED_PRECONDITION

        def details(self):
            return "state  is not the current global state"

    class Stub:
        def DownloadState(self, request, timeout=None):
            assert request.global_state_digest == "" and request.header.round == 2
            raise Refused()

    class Trainer:
        def conclude(self, state_dir, final, **kw):
            self.called = (state_dir, final, kw)

    agent = ParticipantAgent(AgentSettings(site="site-a", coordinator="127.0.0.1:1", tls=None, state_dir=tmp_path,
                                           insecure=True))
    agent.run_id, agent.trainer = "r1", Trainer()
    agent._finish(Stub(), pb.RunFinished(header=pb.Header(run_id="r1", round=2), reason="finished"))
    assert agent.trainer.called == (tmp_path, None, {"round_no": 2, "reason": "finished"})
    assert "final global state could not be fetched or was refused (FAILED_PRECONDITION" in caplog.text
