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
from kt_core.config_file import ConfigError
from kt_core.distill.mixkd import MixableModule, make_objective
from kt_core.distill.select import select_from_model
from kt_core.vln.backbone import VLNBackbone, VLNConfig
from kt_core.vln.tokenizer import PAD_ID, Tokenizer

DEFAULT_LEVEL = "BabyAI-GoToLocal-v0"
STUDENT_INITS = ("teacher", "random")


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
        vis_mask = b.vision_mask(batch["directions"])      # None without memory
        for layer in b.vision_layers:
            vis = layer(vis, vis_mask)
        for layer in b.cross_layers:
            lang, vis = layer(lang, vis, mask, vis_mask)
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
    student_d_model: int = 0                # 0: the widest student >= 4x smaller than the backbone
    student_cross_layers: int = 1
    student_init: str = "teacher"           # teacher: slices of the teacher's weights (kt_core.distill.select); random
    teacher_rollouts: int = 2               # teacher-labelled rollouts: passes over the site's own seeds (0: none)
    rollout_epsilon: float = 0.2            # share of random turn/forward actions in those rollouts
    rollout_max_steps: int = 20             # steps per rollout episode at most
    demo_cache: str | None = None           # default: out_dir/demos; the site's STATE/demos reuses its own
    backbone: str | None = None             # backbone file or cache folder (default: STATE/backbones beside the teacher)

    @classmethod
    def from_table(cls, table: Mapping) -> "NavOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in table:
            if key not in known:
                raise ConfigError(f"distill.nav.{key}: unknown setting (known: {', '.join(sorted(known))})")
        levels = table.get("levels")
        if isinstance(levels, str):
            levels = [levels]
        if levels is not None and (not isinstance(levels, (list, tuple)) or not levels
                                   or not all(isinstance(x, str) for x in levels)):
            raise ConfigError("distill.nav.levels: must be a non-empty list of BabyAI level names")
        opts = cls(levels=None if levels is None else tuple(levels), **{k: v for k, v in table.items() if k != "levels"})
        for name, lo in (("site_index", 0), ("student_d_model", 0), ("episodes", 1), ("eval_episodes", 1),
                         ("student_cross_layers", 1), ("teacher_rollouts", 0), ("rollout_max_steps", 1)):
            v = getattr(opts, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise ConfigError(f"distill.nav.{name}: must be an integer >= {lo}, got {v!r}")
        if opts.student_init not in STUDENT_INITS:
            raise ConfigError(f"distill.nav.student_init: must be one of {list(STUDENT_INITS)}, got {opts.student_init!r}")
        eps = opts.rollout_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
            raise ConfigError(f"distill.nav.rollout_epsilon: must be a number in [0, 1], got {eps!r}")
        for name in ("demo_cache", "backbone"):
            if getattr(opts, name) is not None and not isinstance(getattr(opts, name), str):
                raise ConfigError(f"distill.nav.{name}: must be a path (a string)")
        return opts

    def for_teacher(self, teacher) -> "NavOptions":
        """These options with the teacher's (kt_core.tasks.AdaptedModel) site data filled in."""
        vln = teacher.config.vln
        where = f"the teacher is {teacher.site}'s model from run {teacher.run_id}"
        if self.levels is not None and tuple(self.levels) != tuple(teacher.levels):
            raise ConfigError(f"distill.nav.levels: {list(self.levels)}, but {where}, adapted on "
                                     f"{list(teacher.levels)}: the student learns on the site's own demonstrations")
        if self.site_index is not None and self.site_index != teacher.site_index:
            raise ConfigError(f"distill.nav.site_index: {self.site_index}, but {where}, whose demonstrations "
                                     f"are seed block {teacher.site_index}")
        return dataclasses.replace(self, levels=tuple(teacher.levels), site_index=teacher.site_index,
                                   episodes=self.episodes or vln.episodes_per_level,
                                   eval_episodes=self.eval_episodes or vln.rollout_episodes or 100)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def demo_dataset(demos, tokenizer: Tokenizer, max_len: int, name: str = "demonstrations",
                 memory: int = 0) -> DictDataset:
    """(mission, observation, expert action) samples as the batches VLNMixable reads; with
    memory, each observation and pose the stack of its past frames (kt_core.vln.memory)."""
    from kt_core.vln.finetune import encode_demos

    t = encode_demos(demos, tokenizer, max_len, memory)
    _, images, directions, actions = t.take(torch.arange(len(t)))
    tokens = t.tokens       # every instruction at max_len, as the teacher's rollouts are: the sets join
    return DictDataset({"tokens": tokens, "mission_mask": (tokens != PAD_ID).long(), "images": images,
                        "directions": directions, "labels": actions},
                       padded=("tokens", "mission_mask"), mask="mission_mask", name=name)


def teacher_rollout_dataset(teacher: VLNBackbone, tokenizer: Tokenizer, site_demos: Mapping[str, object], passes: int,
                            epsilon: float = 0.2, max_steps: int = 20, seed: int = 0,
                            name: str = "teacher rollouts") -> DictDataset | None:
    """More training states with no expert label: the teacher's own (epsilon-perturbed) greedy
    rollouts on the site's training episodes (`site_demos`: level -> that level's Demos; the same
    levels and seeds as the demonstrations, so no environment outside the site's data), every
    visited state labelled with the teacher's action. Behaviour cloning on the bot's ~5 states per
    episode leaves the student lost as soon as it leaves the bot's path; these are the states near
    that path that it meets. Runs on the CPU, deterministic for a given seed (every DDP process
    builds the same set)."""
    from kt_core.vln.babyai import rollout
    from kt_core.vln.finetune import model_policy

    if passes < 1:
        return None
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.to("cpu").eval()
    rng = np.random.default_rng(seed)
    seen: dict[str, list] = {"images": [], "directions": [], "missions": []}
    greedy = model_policy(teacher, tokenizer)

    def policy(images, directions, missions):
        seen["images"].append(np.array(images))
        seen["directions"].append(np.array(directions))
        seen["missions"] += list(missions)
        actions = np.array(greedy(images, directions, missions))
        noisy = rng.random(len(actions)) < epsilon
        actions[noisy] = rng.integers(0, 3, int(noisy.sum()))  # left, right, forward
        return actions

    policy.memory = greedy.memory     # a teacher with memory is handed (and records) its past frames

    try:
        for _ in range(passes):
            for level, demos in site_demos.items():
                if demos.num_episodes:
                    rollout(policy, level, demos.episode_seeds.tolist(), demos.episode_lengths.tolist(),
                            max_steps=max_steps)
        if not seen["missions"]:
            return None
        tokens = torch.from_numpy(np.asarray(tokenizer.encode_batch(seen["missions"], teacher.cfg.max_len))).long()
        data = {"tokens": tokens, "mission_mask": (tokens != PAD_ID).long(),
                "images": torch.from_numpy(np.concatenate(seen["images"])),
                "directions": torch.from_numpy(np.concatenate(seen["directions"])).long()}
        with torch.no_grad():
            labels = torch.cat([VLNMixable(teacher)({k: v[i:i + 512] for k, v in data.items()}).argmax(-1)
                                for i in range(0, len(tokens), 512)])
    finally:
        teacher.to(device).train(was_training)
    return DictDataset({**data, "labels": labels}, padded=("tokens", "mission_mask"), mask="mission_mask", name=name)


def join_datasets(a: DictDataset, b: DictDataset | None, name: str) -> DictDataset:
    if b is None:
        return a
    return DictDataset({k: torch.cat([a.tensors[k], b.tensors[k].to(a.tensors[k].dtype)]) for k in a.tensors},
                       padded=a.padded, mask=a.mask, name=name)


def site_level_demos(opts: NavOptions, cache_dir, data_fraction: float = 1.0) -> dict:
    """level -> the site's demonstrations of that level (what site_data concatenates); with
    data_fraction < 1, only the episodes that the first fraction of the concatenation keeps."""
    from kt_core.vln.babyai import get_demos
    from kt_core.vln.finetune import site_seeds

    per_level = {level: get_demos(level, site_seeds(opts.site_index, opts.episodes), cache_dir)
                 for level in opts.levels}
    left = sum(d.num_episodes for d in per_level.values())
    if data_fraction < 1:
        left = max(1, math.ceil(left * data_fraction))
    out = {}
    for level, d in per_level.items():
        keep = min(left, d.num_episodes)
        if keep:
            out[level] = d if keep == d.num_episodes else d.subset_episodes(keep)
        left -= keep
    return out


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


def widest_student(teacher: VLNConfig, max_parameters: int, cross_layers: int = 1, step: int = 8) -> int:
    """The widest student width (a multiple of `step`, at most the teacher's) whose model has at
    most `max_parameters` (parameters and buffers); half the teacher's width if none fits."""
    for d in range(teacher.d_model - teacher.d_model % step, step - 1, -step):
        if model_size(VLNBackbone(student_config(teacher, d, cross_layers))) <= max_parameters:
            return d
    return max(8, teacher.d_model // 2)


def build_nav_student(teacher: VLNBackbone, d_model: int = 0, cross_layers: int = 1, seed: int = 0,
                      max_parameters: int | None = None, init: str = "teacher") -> VLNBackbone:
    """d_model 0: the widest student within `max_parameters` (for the site: a quarter of the
    backbone's), or half the teacher's width when no budget is given. init "teacher": start from
    slices of the teacher's (adapters folded) weights (kt_core.distill.select); "random": from
    the architecture's own initialisation."""
    if init not in STUDENT_INITS:
        raise ConfigError(f"distill.nav.student_init: {init!r} is not one of {list(STUDENT_INITS)}")
    if not d_model and max_parameters:
        d_model = widest_student(teacher.cfg, max_parameters, cross_layers)
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
    if init == "teacher":
        select_from_model(student, teacher)
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

def rollout_metrics(backbone: VLNBackbone, tokenizer: Tokenizer, levels, episodes: int, cache_dir,
                    validation: bool = False) -> dict:
    """SR and SPL of the greedy policy on `episodes` unseen seeds per level, on the CPU (on the
    validation block instead of the evaluation one with validation=True: for choosing settings)."""
    from kt_core.vln.finetune import evaluate_rollouts

    device = next(backbone.parameters()).device
    backbone.to("cpu")
    try:
        per_level = {lv: evaluate_rollouts(backbone, tokenizer, lv, episodes, cache_dir, validation=validation)
                     for lv in levels}
    finally:
        backbone.to(device)
    return {"success_rate": float(np.mean([r["success_rate"] for r in per_level.values()])),
            "spl": float(np.mean([r["spl"] for r in per_level.values()])), "levels": per_level}


def nav_metrics(model: VLNBackbone, tokenizer: Tokenizer, eval_data: DictDataset, opts: NavOptions, cache_dir,
                device: torch.device, validation: bool = False) -> dict:
    out = {**rollout_metrics(model, tokenizer, opts.levels, opts.eval_episodes, cache_dir, validation),
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
    memory = model.cfg.memory
    train = demo_dataset(demos, loaded.tokenizer, max_len, "site demonstrations", memory)
    ev = demo_dataset(evals, loaded.tokenizer, max_len, "evaluation demonstrations", memory)
    extra = teacher_rollout_dataset(
        model, loaded.tokenizer, site_level_demos(opts, cache, cfg.data.data_fraction), opts.teacher_rollouts,
        opts.rollout_epsilon, opts.rollout_max_steps, cfg.train.seed)
    train = join_datasets(train, extra, "site demonstrations + teacher rollouts")
    teacher = VLNMixable(model)
    student = build_nav_student(model, opts.student_d_model, opts.student_cross_layers, cfg.train.seed,
                                max_parameters=loaded.backbone_parameters // 4, init=opts.student_init)
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
                 "demonstration_samples": len(demos), "teacher_rollout_samples": len(extra) if extra else 0,
                 "teacher_rollouts": {"passes": opts.teacher_rollouts, "epsilon": opts.rollout_epsilon,
                                      "max_steps": opts.rollout_max_steps},
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
