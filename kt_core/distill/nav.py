"""The navigation student: a site's federated VLN model (teacher) distilled into a much smaller one.

Teacher: the site's adapted model as it stands after the federation, read from the file the site
wrote at the end of the run (kt_core.tasks.load_adapted: the hosted backbone, frozen, with the
run's final global shared factors and the site's private factor selection; a VLNBackbone whose
cross-modal linear layers are adapters). Student: the backbone's architecture, narrower and
shallower (by default half the width, no single-stream layers, one cross-modal layer: about 9x
fewer parameters than the default backbone), distilled on the demonstrations the site trained on
in the federation (its levels, its seed block), saved and loaded exactly like a backbone, and
evaluated like the teacher: rollout success rate (SR) and SPL against the BabyAI bot's paths.

MixKD mixes what the model embeds: the mission's word embeddings and the visual tokens (the
grid encoder's per-cell embeddings), each model in its own embedding space with the same λ and
partner. `VLNMixable` exposes that split for any VLNBackbone; the minimal teacher interface is
therefore: a module with `tok_emb`, `pos_emb`, `ln_emb`, `drop`, `lang_layers`, `vision_encoder`,
`vision_layers`, `cross_layers`, `ln_lang`, `pooler`, `action_head` and `cfg` (tests check that
`VLNMixable(b)(batch)` equals `b.act(...)`, so a change to the backbone's forward is caught).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from kt_core.distill.bert import StudentTooLargeError
from kt_core.distill.checkpoint import CheckpointError
from kt_core.distill.loop import DictDataset, count_parameters, evaluate, fit, inference_speed
from kt_core.distill.mixkd import DistillConfigError, MixableModule, make_objective
from kt_core.vln.backbone import VLNBackbone, VLNConfig
from kt_core.vln.tokenizer import PAD_ID, Tokenizer

DEFAULT_LEVEL = "BabyAI-GoToLocal-v0"


class VLNMixable(MixableModule):
    """A VLNBackbone seen as embed (words, visual tokens) -> classify (action logits)."""

    def __init__(self, backbone: VLNBackbone):
        super().__init__()
        self.backbone = backbone

    @property
    def cfg(self) -> VLNConfig:
        return self.backbone.cfg

    def embed(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        b = self.backbone
        return {"words": b.tok_emb(batch["tokens"]), "vision": b.vision_encoder(batch["images"], batch["directions"])}

    def classify(self, embedded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        # VLNBackbone.forward from its embeddings on (the part that leads to the action)
        b = self.backbone
        words, vis = embedded["words"], embedded["vision"]
        mask = batch["mission_mask"].bool()
        lang = b.drop(b.ln_emb(words + b.pos_emb.weight[:words.shape[1]]))
        for layer in b.lang_layers:
            lang = layer(lang, mask)
        vis = b.drop(vis)
        for layer in b.vision_layers:
            vis = layer(vis, None)
        for layer in b.cross_layers:
            lang, vis = layer(lang, vis, mask)
        return b.action_head(torch.tanh(b.pooler(b.ln_lang(lang)[:, 0])))


@dataclass(frozen=True)
class NavOptions:
    """`[distill.nav]`. The teacher is the site's federated model (kt_core.tasks.load_adapted),
    and the student learns on the demonstrations the site trained on in the federation: levels,
    seed block and episode count default to the teacher's own (None), and levels or a seed block
    other than the teacher's are refused. Rollouts default to the run's final evaluation's count,
    on the same unseen seeds, so the teacher's SR / SPL here are the site's evaluation's."""

    levels: tuple[str, ...] | None = None   # the site's levels (default: the teacher's)
    site_index: int | None = None           # the site's seed block (kt_core.vln.finetune; default: the teacher's)
    episodes: int | None = None             # training episodes per level (default: the run's episodes_per_level)
    eval_episodes: int | None = None        # unseen rollout seeds per level (default: the run's rollout_episodes)
    student_d_model: int = 0                # 0: half the teacher's width
    student_cross_layers: int = 1
    demo_cache: str | None = None           # default: out_dir/demos; the site's STATE/demos reuses its own
    backbone: str | None = None             # backbone file or cache folder (default: STATE/backbones beside the teacher)

    @classmethod
    def from_table(cls, table: Mapping) -> "NavOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in table:
            if key not in known:
                raise DistillConfigError(f"distill.nav.{key}: unknown setting (known: {', '.join(sorted(known))})")
        levels = table.get("levels")
        if isinstance(levels, str):
            levels = [levels]
        if levels is not None and (not isinstance(levels, (list, tuple)) or not levels
                                   or not all(isinstance(x, str) for x in levels)):
            raise DistillConfigError("distill.nav.levels: must be a non-empty list of BabyAI level names")
        opts = cls(levels=None if levels is None else tuple(levels), **{k: v for k, v in table.items() if k != "levels"})
        for name, lo in (("site_index", 0), ("student_d_model", 0), ("episodes", 1), ("eval_episodes", 1),
                         ("student_cross_layers", 1)):
            v = getattr(opts, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise DistillConfigError(f"distill.nav.{name}: must be an integer >= {lo}, got {v!r}")
        for name in ("demo_cache", "backbone"):
            if getattr(opts, name) is not None and not isinstance(getattr(opts, name), str):
                raise DistillConfigError(f"distill.nav.{name}: must be a path (a string)")
        return opts

    def for_teacher(self, teacher) -> "NavOptions":
        """These options with the teacher's (kt_core.tasks.AdaptedModel) site data filled in."""
        vln = teacher.config.vln
        where = f"the teacher is {teacher.site}'s model from run {teacher.run_id}"
        if self.levels is not None and tuple(self.levels) != tuple(teacher.levels):
            raise DistillConfigError(f"distill.nav.levels: {list(self.levels)}, but {where}, adapted on "
                                     f"{list(teacher.levels)}: the student learns on the site's own demonstrations")
        if self.site_index is not None and self.site_index != teacher.site_index:
            raise DistillConfigError(f"distill.nav.site_index: {self.site_index}, but {where}, whose demonstrations "
                                     f"are seed block {teacher.site_index}")
        return dataclasses.replace(self, levels=tuple(teacher.levels), site_index=teacher.site_index,
                                   episodes=self.episodes or vln.episodes_per_level,
                                   eval_episodes=self.eval_episodes or vln.rollout_episodes or 100)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def demo_dataset(demos, tokenizer: Tokenizer, max_len: int, name: str = "demonstrations") -> DictDataset:
    """(mission, observation, expert action) samples as the batches VLNMixable reads."""
    from kt_core.vln.finetune import encode_demos

    t = encode_demos(demos, tokenizer, max_len)
    return DictDataset({"tokens": t.tokens, "mission_mask": (t.tokens != PAD_ID).long(), "images": t.images,
                        "directions": t.directions, "labels": t.actions},
                       padded=("tokens", "mission_mask"), mask="mission_mask", name=name)


def eval_demos(levels, episodes: int, cache_dir):
    from kt_core.vln.babyai import Demos, get_demos
    from kt_core.vln.finetune import eval_seeds

    return Demos.concat([get_demos(level, eval_seeds(episodes), cache_dir) for level in levels])


# ---------------------------------------------------------------------------------------------
# the student
# ---------------------------------------------------------------------------------------------

def student_config(teacher: VLNConfig, d_model: int = 0, cross_layers: int = 1, seed: int = 0) -> VLNConfig:
    d = d_model or max(8, teacher.d_model // 2)
    heads = next(h for h in range(min(teacher.n_heads, max(1, d // 16)), 0, -1) if d % h == 0)
    return dataclasses.replace(teacher, d_model=d, n_heads=heads, n_lang_layers=0, n_vision_layers=0,
                               n_cross_layers=cross_layers, seed=seed)


def build_nav_student(teacher: VLNBackbone, d_model: int = 0, cross_layers: int = 1, seed: int = 0) -> VLNBackbone:
    cfg = student_config(teacher.cfg, d_model, cross_layers, seed)
    if cfg.d_model > teacher.cfg.d_model:
        raise StudentTooLargeError(f"distill.nav.student_d_model: {cfg.d_model} > the teacher's {teacher.cfg.d_model}")
    if cross_layers > teacher.cfg.n_cross_layers:
        raise StudentTooLargeError(f"distill.nav.student_cross_layers: {cross_layers} > the teacher's "
                                   f"{teacher.cfg.n_cross_layers}")
    student = VLNBackbone(cfg)
    s, t = count_parameters(student), count_parameters(teacher)
    if s >= t:
        raise StudentTooLargeError(f"student has {s:,} parameters, not fewer than the teacher's {t:,}")
    return student


def load_nav_teacher(path: Path, backbone: str | Path | None = None):
    """The site's adapted model (kt_core.tasks.AdaptedModel: the frozen hosted backbone, the
    run's final global shared factors and the site's private factor selection), errors as
    CheckpointError naming the teacher."""
    from kt_core.tasks import AdaptedModelError, load_adapted

    try:
        teacher = load_adapted(path, backbone)
    except AdaptedModelError as err:
        raise CheckpointError(f"distill.teacher: {err}") from None
    if teacher.config.task.kind != "vln":
        raise CheckpointError(f"distill.teacher: {path} is a site's model of the {teacher.config.task.kind!r} task, "
                              "not a navigation model")
    return teacher


def model_size(model: torch.nn.Module) -> int:
    """Every number the model computes with: parameters and buffers (an adapter's frozen base
    weight W0 is a buffer, so parameters alone would undercount the teacher)."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def rollout_metrics(backbone: VLNBackbone, tokenizer: Tokenizer, levels, episodes: int, cache_dir) -> dict:
    """SR and SPL of the greedy policy on `episodes` unseen seeds per level, on the CPU."""
    from kt_core.vln.finetune import evaluate_rollouts

    device = next(backbone.parameters()).device
    backbone.to("cpu")
    try:
        per_level = {lv: evaluate_rollouts(backbone, tokenizer, lv, episodes, cache_dir) for lv in levels}
    finally:
        backbone.to(device)
    return {"success_rate": float(np.mean([r["success_rate"] for r in per_level.values()])),
            "spl": float(np.mean([r["spl"] for r in per_level.values()])), "levels": per_level}


def nav_metrics(model: VLNBackbone, tokenizer: Tokenizer, eval_data: DictDataset, opts: NavOptions, cache_dir,
                device: torch.device) -> dict:
    out = {**rollout_metrics(model, tokenizer, opts.levels, opts.eval_episodes, cache_dir),
           "action_accuracy": evaluate(VLNMixable(model), eval_data, device)["accuracy"]}
    out["accuracy"] = out["action_accuracy"]
    return out


def run_site_distill(cfg, ctx, device: torch.device, *, progress: bool = True, write=None) -> dict:
    """participant.distiller's navigation task: the site's adapted model + the site's own
    demonstrations -> student, report (SR / SPL / action accuracy for both), written by `write`
    on rank 0."""
    import logging
    import time

    from kt_core.distill import ddp
    from kt_core.distill.device import capabilities
    from kt_core.vln.checkpoint import save_backbone
    from kt_core.vln.finetune import site_data

    started = time.monotonic()
    opts = NavOptions.from_table(cfg.nav)
    loaded = load_nav_teacher(cfg.teacher, opts.backbone)
    opts = opts.for_teacher(loaded)
    cache = Path(opts.demo_cache) if opts.demo_cache else cfg.out_dir / "demos"
    if ctx.is_main:  # one process generates the demonstrations, the others read its cache
        demos = site_data(opts.site_index, opts.levels, opts.episodes, cache)
        evals = eval_demos(opts.levels, opts.eval_episodes, cache)
    ddp.barrier()
    if not ctx.is_main:
        demos = site_data(opts.site_index, opts.levels, opts.episodes, cache)
        evals = eval_demos(opts.levels, opts.eval_episodes, cache)
    if cfg.data.data_fraction < 1:
        demos = demos.subset_episodes(max(1, math.ceil(demos.num_episodes * cfg.data.data_fraction)))
    model = loaded.model
    max_len = model.cfg.max_len
    train = demo_dataset(demos, loaded.tokenizer, max_len, "site demonstrations")
    ev = demo_dataset(evals, loaded.tokenizer, max_len, "evaluation demonstrations")
    teacher = VLNMixable(model)
    student = build_nav_student(model, opts.student_d_model, opts.student_cross_layers, cfg.train.seed)
    t_params, s_params = model_size(model), model_size(student)
    if loaded.backbone_parameters < 4 * s_params:
        logging.getLogger(__name__).warning("the student (%d parameters) is not 4x smaller than the backbone (%d)",
                                            s_params, loaded.backbone_parameters)
    history = fit(VLNMixable(student), train, make_objective(cfg.train), teacher=teacher, device=device,
                  eval_data=ev, rank=ctx.rank, world_size=ctx.world_size, ddp_wrap=ddp.wrapper(ctx, device),
                  label=f"nav student ({cfg.train.method})", progress=progress)
    if not ctx.is_main:
        return {}
    cpu = torch.device("cpu")
    report = {
        "task": "nav", "method": cfg.train.method, "levels": list(opts.levels),
        "data": {"train_samples": len(train), "train_episodes": demos.num_episodes, "eval_samples": len(ev),
                 "site_index": opts.site_index, "episodes_per_level": opts.episodes,
                 "eval_episodes_per_level": opts.eval_episodes},
        "teacher": {"path": str(cfg.teacher), "sha256": loaded.sha256, "kind": "federated adapted model",
                    "site": loaded.site, "run_id": loaded.run_id, "round": loaded.round,
                    "global_state_digest": loaded.global_state_digest, "backbone_sha256": loaded.backbone_sha256,
                    "backbone_parameters": loaded.backbone_parameters, "parameters": t_params,
                    "test": nav_metrics(model, loaded.tokenizer, ev, opts, cache, device),
                    "cpu_speed": inference_speed(teacher.to(cpu), ev, cpu)},
        "student": {"parameters": s_params, "config": student.cfg.to_dict(),
                    "test": nav_metrics(student, loaded.tokenizer, ev, opts, cache, device),
                    "cpu_speed": inference_speed(VLNMixable(student).to(cpu), ev, cpu)},
        "history": history.to_dict(), "teacher_history": None, "epsilon": None, "world_size": ctx.world_size,
        "device": str(device), "capabilities": capabilities(), "wall_s": time.monotonic() - started,
    }
    report["student"]["retained"] = (report["student"]["test"]["success_rate"]
                                     / max(1e-9, report["teacher"]["test"]["success_rate"]))
    report["compression"] = t_params / s_params
    report["compression_vs_backbone"] = loaded.backbone_parameters / s_params
    card = {"distilled_from": {"adapted_sha256": loaded.sha256, "site": loaded.site, "run_id": loaded.run_id,
                               "backbone_sha256": loaded.backbone_sha256, "method": cfg.train.method},
            "levels": list(opts.levels)}
    return write(cfg, student, report, lambda path: save_backbone(student, loaded.tokenizer, path, card=card))
