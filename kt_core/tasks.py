"""What a run learns, as the services see it, and a site's adapted model after the run.

Every task, built-in or a federation's own, is a kt_core.task_api.FederatedTask; `task_for` gives
the services its runner (kt_core.task_runner.TaskRunner), which builds the run's model (the same at
the coordinator and at every site, so the factor manifest and the round-0 shared state agree),
loads a site's data, trains and evaluates it, and runs the final evaluation. The built-in tasks are
"image" (kt_core.image_task: a classifier with factorized adapters on a local image data set) and
"vln" (kt_core.nav_task: adapters on the hosted, frozen VLN backbone, trained by behaviour cloning
on BabyAI demonstrations); nothing in the services branches on the kind.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from kt_core.config import ConfigError, RunConfig
from kt_core.vln.checkpoint import sha256_file

if TYPE_CHECKING:
    from kt_core.task_runner import TaskRunner


@dataclass
class TaskModel:
    model: nn.Module
    tokenizer: object | None = None   # the VLN backbone's mission tokenizer


@dataclass
class SiteData:
    """One site's own data, as its task loaded it: never leaves the site."""
    train: Any
    test: Any                          # unseen examples: the per-round accuracy the coordinator shows
    num_samples: int                   # training records (the FedAvg weight and DP's N)
    levels: tuple[str, ...] = ()       # the navigation levels this site holds (none for images)
    context: Any = None                # the task_api.SiteContext the task loaded them in
    local: Any = None                  # the task's own task_api.LocalData
    validation: Any = None             # held back from train: what the site judges the model it keeps by


def task_for(config: RunConfig, site_data: Path | None = None) -> "TaskRunner":
    """The run's task, ready to build, train and evaluate (kt_core.task_runner); `site_data`: a
    site's own data file, where it has one."""
    from kt_core.task_runner import TaskRunner

    return TaskRunner(config, site_data)


def build(config: RunConfig, backbone: Path | None = None) -> TaskModel:
    """The run's model. With a hosted backbone, `backbone` is the checkpoint file whose SHA-256
    the run names; a file with another digest or architecture is refused."""
    return task_for(config).build(backbone)


def check_levels(config: RunConfig) -> None:
    """Everything the run's task checks of its config before a run starts (e.g. VLN levels)."""
    task_for(config).check()


def with_backbone_digest(config: RunConfig, sha256: str) -> RunConfig:
    return dataclasses.replace(config, vln=dataclasses.replace(config.vln, backbone_sha256=sha256))


# ---------------------------------------------------------------------------------------------
# a site's adapted model after the run: one safetensors file, rebuilt on the frozen backbone
# ---------------------------------------------------------------------------------------------
# WAFFLe never gives any one party a site's model: the coordinator holds only the shared factors,
# the site alone adds its private factor selection. At the end of a run the site therefore writes
# the two together (the run's final global shared state + its private state) with everything
# needed to rebuild the model around them: the run config, the backbone's digest, its levels. The
# frozen backbone is not copied in; it is found again by that digest (the site's backbone cache).

ADAPTED_FORMAT = "ktfed-adapted-model/1"
# which of a site's models an adapted file holds (its `kept` metadata, the evaluation's `model`)
KEPT_FINAL_AGGREGATE = "final global state + private factors"
KEPT_LAST_LOCAL = "last local model"
_ADAPTED_FIELDS = ("format", "task", "run_config", "backbone_sha256", "site", "site_index", "levels", "run_id",
                   "round", "finished_reason", "global_state_digest", "shared_state_digest", "private_state_digest")


class AdaptedModelError(ValueError):
    """An adapted-model file that must not be used; the message names the file and what is wrong."""


@dataclass
class AdaptedModel:
    model: nn.Module                 # in eval mode: the posterior-mode factor selection
    tokenizer: object | None
    config: RunConfig
    site: str
    site_index: int
    levels: tuple[str, ...]
    run_id: str
    round: int
    global_state_digest: str         # the coordinator's digest of the final global state
    backbone_sha256: str
    backbone_path: Path | None
    backbone_parameters: int         # of the plain backbone (0 for the image task)
    sha256: str                      # of the adapted file itself
    path: Path
    meta: dict


def adapted_path(state_dir: str | Path, run_id: str) -> Path:
    return Path(state_dir) / f"adapted-{run_id}.safetensors"


def state_digest_of(tensors: dict) -> str:
    """kt_core.codec's digest of a set of tensors: the one the coordinator names a global state by."""
    from kt_core import codec

    return codec.state_digest(spec for spec, _ in codec.encode(
        {n: t.detach().cpu().numpy() for n, t in tensors.items()}))


def save_adapted(path: str | Path, model: nn.Module, config: RunConfig, *, site: str, levels, run_id: str,
                 round_no: int, global_state_digest: str, reason: str = "finished",
                 kept: str = KEPT_FINAL_AGGREGATE) -> dict:
    """Write the site's adapted model atomically (tmp + rename), readable by its owner only:
    shared and private tensors, with the run config and provenance as safetensors metadata
    (`kept`: which of the site's models these tensors are; `global_state_digest` is the run's
    final state either way). Returns the metadata."""
    from safetensors.torch import save_file

    from kt_core.models import private_state, shared_state

    shared, private = shared_state(model), private_state(model)
    meta = {"format": ADAPTED_FORMAT, "task": config.task.kind, "run_config": config.to_json(),
            "backbone_sha256": task_for(config).backbone_sha256(),
            "site": site, "site_index": str(config.federation.sites.index(site)),
            "levels": json.dumps(list(levels)), "run_id": run_id, "round": str(int(round_no)),
            "finished_reason": reason, "global_state_digest": global_state_digest, "kept": kept,
            "shared_state_digest": state_digest_of(shared), "private_state_digest": state_digest_of(private)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({n: t.contiguous() for n, t in {**shared, **private}.items()}, str(tmp), metadata=meta)
        os.chmod(tmp, 0o600)   # a site's own model (private factors included): not for other users
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _backbone_for(path: Path, sha256: str, backbone: str | Path | None) -> Path:
    """The backbone file: given, or `<sha256>.safetensors` in a given cache folder, or in the
    site's cache beside the adapted file (STATE/backbones, participant.backbone_cache's layout)."""
    if backbone is None:
        candidate = path.parent / "backbones" / f"{sha256}.safetensors"
    elif Path(backbone).is_dir():
        candidate = Path(backbone) / f"{sha256}.safetensors"
    else:
        candidate = Path(backbone)
    if not candidate.is_file():
        raise AdaptedModelError(f"adapted model {path}: backbone {candidate} not found (name the backbone file "
                                f"or the site's backbone cache folder holding {sha256[:16]}….safetensors)")
    actual = sha256_file(candidate)
    if actual != sha256:
        raise AdaptedModelError(f"adapted model {path}: backbone digest mismatch: it was adapted from backbone "
                                f"{sha256}, but {candidate} has SHA-256 {actual}")
    return candidate


def _read_adapted(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise AdaptedModelError(f"adapted model {path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on bad bytes
        raise AdaptedModelError(f"adapted model {path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != ADAPTED_FORMAT:
        raise AdaptedModelError(f"adapted model {path}: format {meta.get('format')!r}, expected {ADAPTED_FORMAT!r}")
    missing = [k for k in _ADAPTED_FIELDS if k not in meta]
    if missing:
        raise AdaptedModelError(f"adapted model {path}: metadata field(s) {missing} missing")
    return meta, tensors


def load_adapted(path: str | Path, backbone: str | Path | None = None) -> AdaptedModel:
    """Rebuild a site's adapted model from `save_adapted`'s file and check it: the format and
    metadata, the tensors against the digests recorded at writing (damage), the backbone against
    the digest the run names, and every tensor's name, shape and dtype against the model that the
    recorded config builds. `backbone`: the file, a cache folder, or None for STATE/backbones."""
    from kt_core.models import load_private_state, load_shared_state

    path = Path(path)
    meta, tensors = _read_adapted(path)
    try:
        config = RunConfig.from_json(meta["run_config"])
        levels = tuple(json.loads(meta["levels"]))
        site_index, round_no = int(meta["site_index"]), int(meta["round"])
    except (ConfigError, ValueError, TypeError) as err:
        raise AdaptedModelError(f"adapted model {path}: bad metadata ({err})") from None
    if meta["task"] != config.task.kind or meta["site"] not in config.federation.sites:
        raise AdaptedModelError(f"adapted model {path}: metadata disagrees with its run config (task or site)")
    backbone_path, backbone_params = None, 0
    if task_for(config).hosts_backbone:
        sha = meta["backbone_sha256"]
        if sha != config.vln.backbone_sha256 or not sha:
            raise AdaptedModelError(f"adapted model {path}: backbone_sha256 {sha!r} is not the run config's "
                                    f"{config.vln.backbone_sha256!r}")
        backbone_path = _backbone_for(path, sha, backbone)
    try:
        built = build(config, backbone_path)
    except (ConfigError, ValueError) as err:
        raise AdaptedModelError(f"adapted model {path}: its run config does not build a model ({err})") from None
    if backbone_path is not None:
        backbone_params = _parameter_count(backbone_path)
    from kt_core.manifest import Role, manifest_of

    roles = {e.name: e.role for e in manifest_of(built.model).entries if e.role is not Role.FROZEN}
    missing, unexpected = sorted(set(roles) - set(tensors)), sorted(set(tensors) - set(roles))
    if missing or unexpected:
        raise AdaptedModelError(f"adapted model {path}: tensors do not match the model its config builds: "
                                + "; ".join(filter(None, [missing and f"missing {missing[:4]}",
                                                          unexpected and f"unexpected {unexpected[:4]}"])))
    shared = {n: t for n, t in tensors.items() if roles[n] is Role.SHARED}
    private = {n: t for n, t in tensors.items() if roles[n] is Role.PRIVATE}
    try:
        load_shared_state(built.model, shared)
        load_private_state(built.model, private)
    except ValueError as err:
        raise AdaptedModelError(f"adapted model {path}: tensors do not match the model its config builds: "
                                f"{err}") from None
    if state_digest_of(shared) != meta["shared_state_digest"] or state_digest_of(private) != meta["private_state_digest"]:
        raise AdaptedModelError(f"adapted model {path}: tensor contents do not match the digests recorded when it "
                                "was written (a damaged or altered file)")
    built.model.eval()
    return AdaptedModel(built.model, built.tokenizer, config, meta["site"], site_index, levels, meta["run_id"],
                        round_no, meta["global_state_digest"], meta["backbone_sha256"], backbone_path,
                        backbone_params, sha256_file(path), path, meta)


def _parameter_count(checkpoint: Path) -> int:
    """Parameters of a backbone checkpoint, from its header (the tensors are not read)."""
    import math

    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt", device="cpu") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
