"""PREVALENT-style pretraining of the backbone on BabyAI demonstrations (image-text-action triplets).

Two objectives with equal weights, on every batch:
  attended masked language modelling   mask ~15% of the mission's words and predict them from the
                                       language stream after the cross-modal layers, i.e. while
                                       attending to the observation
  action prediction                    the expert's next action from the pooled [CLS], on the
                                       unmasked mission
A plain loop: AdamW, linear warm-up then cosine decay, gradient-norm clip 1, tqdm progress bar.
`run_pretraining` writes the checkpoint, its model card and a loss-curve PNG.

The settings come from a TOML file (`ktfed pretrain --config FILE`):
    [model]      VLNConfig fields (vocab_size is set from the tokenizer)
    [pretrain]   PretrainSettings fields
Every error names its field, e.g. `pretrain.lr: must be a finite number > 0`.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kt_core.config_file import build, check_known, load_table
from kt_core.vln.babyai import BabyAIError, Demos, check_level, get_demos
from kt_core.vln.backbone import VLNBackbone, VLNConfig, count_parameters, mask_tokens
from kt_core.vln.checkpoint import save_backbone
from kt_core.vln.finetune import (EVAL_SEED_BASE, PRETRAIN_SEED_BASE, DemoTensors, encode_demos, evaluate,
                                  evaluate_rollouts)
from kt_core.vln.tokenizer import Tokenizer

# Twelve levels of going to objects and doors and opening doors, one room or several; no picking
# up or putting next, so the pickup levels stay outside pretraining (bench/vln's PREVALENT claim)
DEFAULT_LEVELS = ("BabyAI-GoToObj-v0", "BabyAI-GoToRedBlueBall-v0", "BabyAI-GoToLocal-v0", "BabyAI-GoToObjDoor-v0",
                  "BabyAI-GoToDoor-v0", "BabyAI-OpenDoor-v0", "BabyAI-GoToRedBall-v0", "BabyAI-GoToRedBallNoDists-v0",
                  "BabyAI-OpenRedDoor-v0", "BabyAI-OpenDoorColor-v0", "BabyAI-OpenDoorLoc-v0",
                  "BabyAI-GoToLocalS8N3-v0")


@dataclass(frozen=True)
class PretrainSettings:
    levels: tuple[str, ...] = DEFAULT_LEVELS
    episodes_per_level: int = 400
    val_episodes: int = 40            # per level, unseen seeds: action accuracy / MLM loss at the end
    rollout_episodes: int = 50        # per level, unseen seeds: success rate and SPL at the end (0: skip)
    steps: int = 3000
    batch_size: int = 64              # half masked (MLM loss), half intact (action loss)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    mask_prob: float = 0.15
    seed: int = 0
    cache_dir: str = ""               # demonstration cache; "" = do not cache
    device: str = "auto"              # auto (CUDA when present, else CPU) | cpu | cuda

    def validate(self) -> None:
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise ValueError("levels: must be a non-empty list of distinct BabyAI level names")
        for level in self.levels:
            try:
                check_level(level)
            except BabyAIError as err:
                raise ValueError(f"levels: {err}") from None
        for name, lo in (("episodes_per_level", 1), ("val_episodes", 1), ("rollout_episodes", 0), ("steps", 1),
                         ("batch_size", 2), ("warmup_steps", 0), ("seed", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}: must be >= {lo}, got {getattr(self, name)}")
        if self.episodes_per_level + self.val_episodes > EVAL_SEED_BASE:
            raise ValueError("episodes_per_level: too many for the pretraining seed block")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for, but torch sees no CUDA device here")
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob: must be in (0, 1), got {self.mask_prob}")

    @property
    def train_seeds(self) -> tuple[int, int]:
        return PRETRAIN_SEED_BASE, PRETRAIN_SEED_BASE + self.episodes_per_level

    @property
    def val_seeds(self) -> tuple[int, int]:
        # right after the training block, still inside the pretraining block: disjoint from both
        # the sites' seeds and the evaluation seeds
        return self.train_seeds[1], self.train_seeds[1] + self.val_episodes


# ---------------------------------------------------------------------------------------------
# the TOML file
# ---------------------------------------------------------------------------------------------

def parse_config(doc: dict) -> tuple[VLNConfig, PretrainSettings]:
    check_known(doc, ("model", "pretrain"), "", kind="section")
    # vocab_size comes from the tokenizer: a config cannot get it wrong
    model = build(VLNConfig, doc.get("model", {}), "model", skip=("vocab_size",))
    return model, build(PretrainSettings, doc.get("pretrain", {}), "pretrain")


def load_config(path: str | Path) -> tuple[VLNConfig, PretrainSettings]:
    return parse_config(load_table(path, "pretraining config"))


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def load_level_demos(levels, seeds: tuple[int, int], cache_dir: str | Path | None, desc: str) -> Demos:
    from tqdm import tqdm

    with tqdm(total=len(levels) * (seeds[1] - seeds[0]), desc=desc, unit="ep", mininterval=1.0,
              disable=not sys.stderr.isatty(), leave=False) as bar:
        return Demos.concat([get_demos(lv, seeds, cache_dir or None, progress=bar.update) for lv in levels])


def lr_at(step: int, settings: PretrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def pretraining_losses(model: VLNBackbone, batch, mask_prob: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked-language-modelling loss, action loss) on one batch in one forward pass: the first
    half of the batch has masked instructions and gives the MLM loss, the second half is left
    intact and gives the action loss (an instruction with its colour word masked does not say
    which way to go, so action prediction on masked input would learn from ambiguous labels)."""
    tokens, images, directions, actions = batch
    h = max(1, tokens.shape[0] // 2)
    masked, labels = mask_tokens(tokens[:h], model.cfg.vocab_size, mask_prob, gen)
    out = model(torch.cat([masked, tokens[h:]]), images, directions)
    mlm_logits = model.mlm_logits(out)[:h]
    mlm = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    action = F.cross_entropy(model.action_head(out.pooled[h:]), actions[h:])
    return mlm, action


@torch.no_grad()
def mlm_accuracy(model: VLNBackbone, data: DemoTensors, mask_prob: float, seed: int = 0, batch_size: int = 512) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for i in range(0, len(data), batch_size):
        tokens, images, directions, _ = data.take(torch.arange(i, min(i + batch_size, len(data))))
        masked, labels = mask_tokens(tokens, model.cfg.vocab_size, mask_prob, gen)
        pred = model.mlm_logits(model(masked, images, directions)).argmax(-1)
        sel = labels != -100
        correct += int((pred[sel] == labels[sel]).sum())
        total += int(sel.sum())
    return correct / max(total, 1)


def pretraining_throughput(model_cfg: VLNConfig, data: DemoTensors, device: str | torch.device = "cpu",
                           batch_sizes: tuple[int, ...] = (64,), steps: int = 20, warmup: int = 5) -> dict[int, float]:
    """Samples per second of the full pretraining step (forward, both losses, backward, AdamW) at
    each batch size, on `device`, after `warmup` untimed steps."""
    device = torch.device(device)
    model = VLNBackbone(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {}
    for batch in batch_sizes:
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                start = time.perf_counter()
            tokens, images, directions, actions = data.take(torch.randint(len(data), (batch,), generator=gen))
            mlm, action = pretraining_losses(model, (tokens.to(device), images.to(device), directions.to(device),
                                                     actions.to(device)), 0.15, gen)
            optimizer.zero_grad(set_to_none=True)
            (mlm + action).backward()
            optimizer.step()
        sync()
        rates[batch] = steps * batch / (time.perf_counter() - start)
    return rates


@dataclass
class PretrainResult:
    model: VLNBackbone
    tokenizer: Tokenizer
    history: dict[str, list[float]] = field(default_factory=dict)   # per step: mlm, action, lr
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    samples_per_s: float = 0.0
    card: dict | None = None
    device: str = "cpu"               # where the steps ran


def pretrain(model_cfg: VLNConfig, settings: PretrainSettings, *, progress: bool = True,
             evaluate_at_end: bool = True) -> PretrainResult:
    """Build the tokenizer and the backbone, gather the demonstrations, train, evaluate."""
    settings.validate()
    cache = settings.cache_dir or None
    train = load_level_demos(settings.levels, settings.train_seeds, cache, "demonstrations")
    tokenizer = Tokenizer.from_texts(train.missions)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer))
    device = torch.device("cuda" if settings.device == "cuda" or (settings.device == "auto"
                                                                 and torch.cuda.is_available()) else "cpu")
    model = VLNBackbone(model_cfg).to(device)
    data = encode_demos(train, tokenizer, model_cfg.max_len, model_cfg.memory)
    gen = torch.Generator().manual_seed(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    history = {"mlm": [], "action": [], "lr": []}
    tty = sys.stderr.isatty()
    from tqdm import tqdm

    bar = tqdm(range(settings.steps), desc=f"pretraining ({device.type})", unit="step", mininterval=1.0,
               disable=not (progress and tty))
    every = max(1, settings.steps // 10)
    model.train()
    start = time.perf_counter()
    for step in bar:
        idx = torch.randint(len(data), (settings.batch_size,), generator=gen)
        mlm, action = pretraining_losses(model, data.take(idx, device), settings.mask_prob, gen)
        loss = mlm + action                      # equal weights, as in PREVALENT
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history["mlm"].append(mlm.item())
        history["action"].append(action.item())
        history["lr"].append(optimizer.param_groups[0]["lr"])
        if step % 20 == 0:
            bar.set_postfix(mlm=f"{np.mean(history['mlm'][-50:]):.3f}", action=f"{np.mean(history['action'][-50:]):.3f}")
        if progress and not tty and ((step + 1) % every == 0 or step + 1 == settings.steps):
            print(f"pretraining step {step + 1}/{settings.steps}: mlm {np.mean(history['mlm'][-every:]):.3f}, "
                  f"action {np.mean(history['action'][-every:]):.3f}, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.to("cpu")           # evaluated, saved and hosted on the CPU
    result = PretrainResult(model, tokenizer, history, {}, seconds, settings.steps * settings.batch_size / seconds,
                            device=device.type)
    if evaluate_at_end:
        result.metrics = evaluate_pretrained(model, tokenizer, settings)
    model.eval()
    return result


def evaluate_pretrained(model: VLNBackbone, tokenizer: Tokenizer, settings: PretrainSettings) -> dict:
    """Held-out (unseen seeds) action accuracy and MLM accuracy over all levels, and rollouts."""
    cache = settings.cache_dir or None
    val = encode_demos(load_level_demos(settings.levels, settings.val_seeds, cache, "validation"), tokenizer,
                       model.cfg.max_len, model.cfg.memory)
    metrics = {"val_samples": len(val), **{f"val_action_{k}": v for k, v in evaluate(model, val).items()},
               "val_mlm_accuracy": mlm_accuracy(model, val, settings.mask_prob)}
    if settings.rollout_episodes:
        rollouts = {lv: evaluate_rollouts(model, tokenizer, lv, settings.rollout_episodes, cache)
                    for lv in settings.levels}
        metrics["rollouts"] = rollouts
        metrics["success_rate"] = float(np.mean([r["success_rate"] for r in rollouts.values()]))
        metrics["spl"] = float(np.mean([r["spl"] for r in rollouts.values()]))
    return metrics


def final_loss(values: list[float]) -> float:
    """The 'final' loss the model card, stdout and the plot's legend all report: the mean of the
    last 5% of steps (one step's loss is too noisy to quote)."""
    return float(np.mean(values[-max(1, len(values) // 20):]))


def plot_losses(history: dict[str, list[float]], path: Path, title: str = "") -> list[str]:
    """Write the loss curves to PATH; returns the legend's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("mlm", "masked language modelling"), ("action", "action prediction")):
        y = np.asarray(history[key])
        w = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w, smooth, label=f"{label} (final {final_loss(list(y)):.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (moving average)")
    ax.set_yscale("log")
    ax.set_title(title or "PREVALENT-style pretraining on BabyAI demonstrations")
    ax.grid(alpha=0.3)
    labels = [text.get_text() for text in ax.legend().get_texts()]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return labels


def run_pretraining(model_cfg: VLNConfig, settings: PretrainSettings, out_dir: str | Path, *,
                    progress: bool = True) -> PretrainResult:
    """pretrain, then write out_dir/backbone.safetensors, backbone.card.json and loss.png."""
    import minigrid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = pretrain(model_cfg, settings, progress=progress)
    card = {
        "task": "PREVALENT-style pretraining: attended MLM + action prediction, equal weights",
        "data": {"source": f"minigrid {minigrid.__version__} BabyAIBot demonstrations", "levels": list(settings.levels),
                 "train_seeds": list(settings.train_seeds), "val_seeds": list(settings.val_seeds),
                 "eval_seeds": [EVAL_SEED_BASE, EVAL_SEED_BASE + settings.rollout_episodes]},
        "settings": {**dataclasses.asdict(settings), "levels": list(settings.levels)},
        "steps": settings.steps,
        "losses": {"final_mlm": final_loss(result.history["mlm"]), "final_action": final_loss(result.history["action"]),
                   "mlm_every_10": result.history["mlm"][::10], "action_every_10": result.history["action"][::10]},
        "metrics": result.metrics,
        "trainable_parameters": count_parameters(result.model),
        "seconds": result.seconds, "samples_per_s": result.samples_per_s, "device": result.device,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "tokenizer": result.tokenizer.vocab,
    }
    result.card = save_backbone(result.model, result.tokenizer, out / "backbone.safetensors", card)
    plot_losses(result.history, out / "loss.png")
    return result
