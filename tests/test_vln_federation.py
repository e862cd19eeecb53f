"""The navigation task over the real services: the coordinator hosts a pretrained backbone, sites
download it once (digest-checked, cached by digest), adapt it with WAFFLe adapters on their own
BabyAI levels, and only the adapters' shared factors cross the wire."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kt_core.config import ConfigError, load_toml
from kt_core.vln.backbone import VLNConfig
from kt_core.vln.pretrain import PretrainSettings, run_pretraining
from tests.conftest import fast_config
from tests.test_audit_federation import verify_strictly

LEVELS = ("BabyAI-GoToObj-v0", "BabyAI-GoToLocal-v0", "BabyAI-GoToRedBlueBall-v0", "BabyAI-GoToObjDoor-v0")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny pretrained backbone (seconds on one core): the architecture and the file are real."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("backbone")
    settings = PretrainSettings(levels=LEVELS[:2], episodes_per_level=15, val_episodes=4, rollout_episodes=0,
                                steps=20, batch_size=16, cache_dir=str(out / "demos"))
    run_pretraining(VLNConfig.tiny(), settings, out, progress=False)
    return out / "backbone.safetensors"


def vln_config(backbone: Path, rounds: int = 2, extra: str = "") -> str:
    return fast_config(rounds=rounds, min_sites=3, epochs=1) + f"""
[task]
kind = "vln"

[vln]
backbone = "{backbone}"
levels = ["{LEVELS[0]}", "{LEVELS[1]}", "{LEVELS[2]}"]
held_out_levels = ["{LEVELS[3]}"]
episodes_per_level = 8
eval_episodes = 3
rollout_episodes = 2

[vln.adapter]
adapter = "waffle"
n_factors = 4
""" + extra


@pytest.mark.slow
def test_sites_download_the_backbone_once_and_adapt_it(federation, backbone):
    text = vln_config(backbone) + "\n[secagg]\nenabled = true\nclip_norm = 100.0\n"
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    for site in ("site-a", "site-b", "site-c"):
        federation.start_participant(site)
    status = federation.wait_for(lambda: (s := federation.status()).state == "finished" and s, 240,
                                 "the vln run to finish")
    assert [r.secagg for r in status.rounds] == [True, True]
    sha = json.loads((backbone.parent / "backbone.card.json").read_text())["checkpoint"]["sha256"]
    for site in ("site-a", "site-b", "site-c"):
        cached = federation.workdir / "sites" / site / "backbones" / f"{sha}.safetensors"
        assert cached.read_bytes() == backbone.read_bytes()
        assert f"{site}/accuracy" in status.rounds[-1].metrics
    for proc in federation.participants.values():
        proc.wait(60)
    evaluation = json.loads(next((federation.workdir / "sites" / "site-a").glob("evaluation-*.json")).read_text())
    assert 0.0 <= evaluation["success_rate"] <= 1.0 and 0.0 <= evaluation["spl"] <= evaluation["success_rate"] + 1e-9
    assert evaluation["held_out_success_rate"] is not None
    # the backbone crossed once per site, the audit logs say so and verify
    dirs = [federation.workdir / "coordinator" / "audit"] + \
        [federation.workdir / "sites" / s / "audit" for s in ("site-a", "site-b", "site-c")]
    result = verify_strictly(dirs, federation.pki / "ca.crt")
    coordinator = next(v for v in result.logs if v.producer == "coordinator")
    sent = [e.body for e in coordinator.entries if e.kind == "boundary" and e.body["message"] == "backbone"]
    assert len(sent) == 3 and all(b["sha256"] == sha for b in sent)


def test_a_run_naming_a_missing_backbone_is_refused(federation, tmp_path):
    from coordinator.coordinator import host_backbone

    config = load_toml(vln_config(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="vln.backbone: .*does not exist"):
        host_backbone(config)


def test_a_replaced_backbone_is_refused(backbone, tmp_path):
    from coordinator.coordinator import host_backbone

    config, hosted = host_backbone(load_toml(vln_config(backbone)))
    other = tmp_path / "other.safetensors"
    other.write_bytes(backbone.read_bytes() + b" ")
    replaced = load_toml(vln_config(other))
    replaced = type(replaced).from_json(replaced.to_json().replace('"backbone_sha256": ""',
                                                                   f'"backbone_sha256": "{hosted.sha256}"'))
    with pytest.raises(ConfigError, match="the checkpoint was replaced"):
        host_backbone(replaced)


def test_a_run_needing_memory_refuses_a_backbone_without_it(backbone):
    """The run config states the backbone's memory; a site refuses a hosted checkpoint whose
    model lacks it, naming the field, before it builds anything."""
    from kt_core import tasks

    text = vln_config(backbone).replace("rollout_episodes = 2\n", "rollout_episodes = 2\nmemory = 4\n")
    with pytest.raises(ConfigError, match="vln.backbone: .*memory: the run needs a backbone with memory=4"):
        tasks.build(load_toml(text), backbone)
    assert tasks.build(load_toml(vln_config(backbone)), backbone).model is not None


def test_an_unknown_level_is_refused():
    from kt_core.tasks import check_levels

    config = load_toml(vln_config(Path("x")).replace(LEVELS[1], "BabyAI-NoSuchLevel-v0"))
    with pytest.raises(ConfigError, match="vln.levels"):
        check_levels(config)


def test_rollout_instructions_longer_than_the_backbone_takes_are_found_before_any_bot_runs():
    from kt_core.vln.finetune import check_rollout_instructions
    from kt_core.vln.tokenizer import Tokenizer, TokenizerError

    tok = Tokenizer()
    check_rollout_instructions(tok, 24, ["BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"], 40)
    # BossLevel's instructions reach 27 tokens within 20 seeds; the demo backbone takes 24
    with pytest.raises(TokenizerError, match=r"^BabyAI-BossLevel-v0: instruction has \d+ tokens .* more than max_len=24"):
        check_rollout_instructions(tok, 24, ["BabyAI-GoToLocal-v0", "BabyAI-BossLevel-v0"], 40)
    check_rollout_instructions(tok, 24, ["BabyAI-BossLevel-v0"], 0)   # no rollouts: nothing to check


def test_a_run_whose_held_out_level_does_not_fit_the_backbone_fails_at_once_naming_it(backbone, tmp_path):
    # without the check each site would train the whole run and fail in its closing rollouts
    from ktfed.simulate import simulate

    text = vln_config(backbone).replace(f'held_out_levels = ["{LEVELS[3]}"]',
                                        'held_out_levels = ["BabyAI-BossLevel-v0"]').replace(
        "rollout_episodes = 2\n", "rollout_episodes = 40\n")
    with pytest.raises(RuntimeError) as err:
        simulate(load_toml(text), 3, tmp_path / "sim", timeout_s=120)
    message = str(err.value)
    assert "failed: too few sites take part: " in message
    assert re.search(r"run_refused: run unworkable: vln\.levels: BabyAI-BossLevel-v0: instruction has \d+ tokens", message)
