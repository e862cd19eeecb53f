"""The demo's pretrained navigation backbone: built once on first use (a few minutes on 2 cores,
with a progress bar), then reused from the cache by every later `ktfed demo`.

$KTFED_DEMO_BACKBONE names another checkpoint to host instead (e.g. one `ktfed pretrain` wrote).
Cache: $KTFED_CACHE_DIR (default ~/.cache/ktfed)/backbones/demo-<key>/, where the key digests the
model and pretraining settings below, so a change to them builds a new backbone instead of
reusing a stale one. A cached checkpoint is checked against its model card's SHA-256 before use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from kt_core.vln.backbone import VLNConfig
from kt_core.vln.pretrain import DEFAULT_LEVELS, PretrainSettings

# The architecture and recipe of the PREVALENT bench (bench/vln.py). Width 128 so that WAFFLe's
# shared factors (8 per layer) cost 12.7x fewer bytes than the dense model; memory of the last 4
# steps (kt_core.vln.memory); 12 levels x 300 bot episodes, 2000 steps: 3 min 15 s on 2 idle
# cores, once. On validation seeds this backbone rolls out at 0.65 mean SR on six of its levels,
# where the earlier reactive one (width 64, 6 levels x 200 episodes, 800 steps) was at 0.45.
DEMO_MODEL = VLNConfig(d_model=128, n_heads=4, n_lang_layers=1, n_vision_layers=0, n_cross_layers=2, memory=4)
DEMO_PRETRAIN = PretrainSettings(levels=DEFAULT_LEVELS, episodes_per_level=300, val_episodes=20,
                                 rollout_episodes=0, steps=2000, batch_size=64, lr=2e-3)


def cache_root() -> Path:
    return Path(os.environ.get("KTFED_CACHE_DIR") or "~/.cache/ktfed").expanduser()


def _key() -> str:
    settings = {"model": DEMO_MODEL.to_dict(), "pretrain": dataclasses.asdict(DEMO_PRETRAIN)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]


def demo_backbone(progress: bool = True) -> Path:
    """The cached demo backbone's checkpoint, pretrained now if there is none (or it is damaged)."""
    from kt_core.vln.checkpoint import CheckpointError, load_backbone
    from kt_core.vln.pretrain import run_pretraining

    given = os.environ.get("KTFED_DEMO_BACKBONE")
    if given:   # a checkpoint the operator chose (`ktfed pretrain` output): used as is
        return Path(given).expanduser()
    folder = cache_root() / "backbones" / f"demo-{_key()}"
    checkpoint = folder / "backbone.safetensors"
    if checkpoint.is_file():
        try:
            load_backbone(checkpoint)
            return checkpoint
        except CheckpointError as err:
            print(f"cached demo backbone unusable ({err}); pretraining it again")
            shutil.rmtree(folder, ignore_errors=True)
    print(f"pretraining the demo's VLN backbone once ({DEMO_PRETRAIN.steps} steps on {len(DEMO_PRETRAIN.levels)} "
          f"BabyAI levels; a few minutes on 2 cores); it is cached in {folder}", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pretraining-", dir=folder.parent))
    try:
        settings = dataclasses.replace(DEMO_PRETRAIN, cache_dir=str(cache_root() / "babyai"))
        run_pretraining(DEMO_MODEL, settings, tmp, progress=progress)
        if folder.exists():     # another demo built it meanwhile: use theirs
            return checkpoint
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return checkpoint
