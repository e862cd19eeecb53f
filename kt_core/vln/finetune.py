"""Behaviour cloning on a site's BabyAI levels, and evaluation: action accuracy and rollouts.

Mirrors kt_core.train for the image task: `train_local(model, data, TrainConfig)` minimizes the
per-sample negative ELBO, cross-entropy of the expert's action plus the adapters' KL term (zero
unless WAFFLe) spread over the local samples; `evaluate(model, data)` gives accuracy and loss.
`evaluate_rollouts` runs the model in the environment on unseen seeds: success rate and SPL.

Seeds are laid out in disjoint blocks so that no two purposes ever share an episode:
    [0, 100 000)              pretraining
    100 000 + 10 000 i + ...  site i's training episodes (sites holding the same level differ)
    [1 000 000, 2 000 000)    evaluation (unseen by pretraining and by every site)
    [2 000 000, ...)          validation: for choosing a recipe, so that the evaluation seeds
                              only ever report final numbers and nothing is tuned on them
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_core.factorized import Adapter
from kt_core.train import TrainConfig, TrainResult, device_of, elbo_loss, train_steps
from kt_core.vln.babyai import NUM_ACTIONS, Demos, Policy, evaluate_policy, get_demos, missions
from kt_core.vln.memory import episode_steps, stack_frames
from kt_core.vln.tokenizer import PAD_ID, Tokenizer, TokenizerError

PRETRAIN_SEED_BASE = 0
SITE_SEED_BASE, SITE_SEED_STRIDE = 100_000, 10_000
EVAL_SEED_BASE = 1_000_000
VALIDATION_SEED_BASE = 2_000_000
MAX_SITES = (EVAL_SEED_BASE - SITE_SEED_BASE) // SITE_SEED_STRIDE   # site blocks end where evaluation starts


def site_seeds(site_index: int, episodes: int) -> tuple[int, int]:
    if not 0 <= site_index < MAX_SITES or not 0 < episodes <= SITE_SEED_STRIDE:
        raise ValueError(f"site_index must be in 0..{MAX_SITES - 1} and episodes in 1..{SITE_SEED_STRIDE}")
    start = SITE_SEED_BASE + SITE_SEED_STRIDE * site_index
    return start, start + episodes


def eval_seeds(episodes: int) -> tuple[int, int]:
    if not 0 < episodes <= VALIDATION_SEED_BASE - EVAL_SEED_BASE:
        raise ValueError(f"episodes must be in 1..{VALIDATION_SEED_BASE - EVAL_SEED_BASE}")
    return EVAL_SEED_BASE, EVAL_SEED_BASE + episodes


def validation_seeds(episodes: int) -> tuple[int, int]:
    """Unseen seeds for model selection, disjoint from the evaluation block (see the module doc)."""
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    return VALIDATION_SEED_BASE, VALIDATION_SEED_BASE + episodes


# ---------------------------------------------------------------------------------------------
# data as tensors
# ---------------------------------------------------------------------------------------------

@dataclass
class DemoTensors:
    tokens: Tensor        # int64 N x L
    images: Tensor        # uint8 N x 7 x 7 x 3
    directions: Tensor    # int64 N
    actions: Tensor       # int64 N
    steps: Tensor | None = None     # int64 N: position in the episode (samples of an episode contiguous)
    memory: int = 0                 # past steps each sample carries (the model's cfg.memory)
    num_actions: int = NUM_ACTIONS

    def __post_init__(self):
        if self.memory and self.steps is None:
            raise ValueError("DemoTensors: memory needs each sample's position in its episode (steps)")

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def take(self, idx: Tensor, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rows idx as (tokens, observation, pose, actions); the instruction columns trimmed to the
        batch's longest ([PAD] is only ever at the end), since attention over padding costs time and
        changes nothing. With memory, the observation and pose are kt_core.vln.memory's stacks."""
        tokens = self.tokens[idx]
        tokens = tokens[:, :max(1, int((tokens != PAD_ID).sum(1).max()))]
        if self.memory:
            obs, pose = stack_frames(self.images, self.directions, self.actions, self.steps, idx, self.memory,
                                     self.num_actions)
        else:
            obs, pose = self.images[idx], self.directions[idx]
        return tuple(t.to(device) for t in (tokens, obs, pose, self.actions[idx]))

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rows idx on the CPU: the batch form kt_core.task_api names (the task runner moves it)."""
        return self.take(idx)

    @staticmethod
    def concat(parts: Sequence[DemoTensors]) -> DemoTensors:
        """One set of the samples of `parts`, in order (episodes stay contiguous)."""
        if not parts or len({(p.memory, p.num_actions, p.steps is None) for p in parts}) != 1:
            raise ValueError("DemoTensors.concat: needs sets of the same memory")
        steps = None if parts[0].steps is None else torch.cat([p.steps for p in parts])
        width = max(p.tokens.shape[1] for p in parts)
        tokens = torch.cat([F.pad(p.tokens, (0, width - p.tokens.shape[1]), value=PAD_ID) for p in parts])
        return DemoTensors(tokens, *(torch.cat([getattr(p, f) for p in parts]) for f in ("images", "directions", "actions")),
                           steps, parts[0].memory, parts[0].num_actions)


def encode_missions(tokenizer: Tokenizer, missions: Sequence[str], max_len: int, level: str) -> np.ndarray:
    """tokenizer.encode_batch, with a refused instruction's level named (TokenizerError)."""
    try:
        return tokenizer.encode_batch(missions, max_len)
    except TokenizerError as err:
        raise TokenizerError(f"{level}: {err}") from None


def encode_demos(demos: Demos, tokenizer: Tokenizer, max_len: int, memory: int = 0) -> DemoTensors:
    """Demonstrations as tensors; `memory` > 0 (the model's cfg.memory) makes each sample carry
    the frames and actions of its episode's previous steps."""
    # a level has few distinct missions: encode each once
    mission_tokens = torch.from_numpy(encode_missions(tokenizer, demos.missions, max_len, demos.level))
    return DemoTensors(mission_tokens[torch.from_numpy(demos.mission_index)], torch.from_numpy(demos.images),
                       torch.from_numpy(demos.directions), torch.from_numpy(demos.actions),
                       torch.from_numpy(episode_steps(demos.episode)), memory)


def site_data(site_index: int, levels: Sequence[str], episodes_per_level: int,
              cache_dir: str | Path | None = None) -> Demos:
    """Site i's private training demonstrations: `episodes_per_level` bot episodes of each of its
    levels, on its own seed block. Sites given different level lists hold non-IID data."""
    if not levels:
        raise ValueError("site_data: a site needs at least one level")
    seeds = site_seeds(site_index, episodes_per_level)
    return Demos.concat([get_demos(level, seeds, cache_dir) for level in levels])


def assign_levels(levels: Sequence[str], n_sites: int) -> list[list[str]]:
    """Deal levels round-robin over the sites: site i holds levels i, i + n, i + 2n, ..."""
    if n_sites < 1 or len(levels) < n_sites:
        raise ValueError(f"need at least one level per site: {len(levels)} levels for {n_sites} sites")
    return [list(levels[i::n_sites]) for i in range(n_sites)]


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------

def train_local(model: nn.Module, data: DemoTensors, cfg: TrainConfig,
                progress: Callable[[int, float], None] | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """Behaviour cloning in place, with kt_core.train's loop (deterministic given cfg.seed, the
    caller's global RNG left as it was). Only parameters with requires_grad train: on an adapted
    backbone, the adapters (and the action head)."""
    n = len(data)
    if n == 0:
        raise ValueError("train_local: no samples")
    device = device_of(model)

    def batch_loss(idx: Tensor) -> Tensor:
        tokens, images, directions, actions = data.take(idx, device)
        return elbo_loss(model, model.act(tokens, images, directions), actions, n, cfg.kl_weight)

    return train_steps(model, n, batch_loss, cfg, progress, optimizer)


@torch.no_grad()
def evaluate(model: nn.Module, data: DemoTensors, batch_size: int = 512) -> dict[str, float]:
    """Accuracy of predicting the expert's action, and mean cross-entropy, in eval mode (on an
    inference copy, adapters folded in)."""
    net = inference_copy(model)
    device = device_of(net)
    return action_metrics(net, (data.take(torch.arange(i, min(i + batch_size, len(data))), device)
                                for i in range(0, len(data), batch_size)))


@torch.no_grad()
def action_metrics(net: nn.Module, batches) -> dict[str, float]:
    """Next-action accuracy and mean cross-entropy of `net` over batches (tokens, images,
    directions, actions): the built-in navigation task's evaluation too."""
    correct, loss_sum, n = 0, 0.0, 0
    for tokens, images, directions, actions in batches:
        logits = net.act(tokens, images, directions)
        loss_sum += F.cross_entropy(logits, actions, reduction="sum").item()
        correct += int((logits.argmax(1) == actions).sum())
        n += int(actions.shape[0])
    if n == 0:
        raise ValueError("evaluate: no samples")
    return {"accuracy": correct / n, "loss": loss_sum / n}


@torch.no_grad()
def inference_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of `model` with every adapter folded into a plain nn.Linear holding
    its effective weight (WAFFLe: W0 + W_a diag(r b) W_b with the gates at their posterior mode).
    The same function, one matmul per layer instead of the adapter's two or three: a rollout makes
    one forward pass per environment step, up to the level's step limit for a failing episode."""
    merged = copy.deepcopy(model).eval()
    for name, module in list(merged.named_modules()):
        if isinstance(module, Adapter):
            weight = module.effective_weight()
            linear = nn.Linear(module.in_features, module.out_features, device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight)
            linear.bias.copy_(module.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(merged.get_submodule(parent_name) if parent_name else merged, attr, linear)
    return merged.requires_grad_(False)


def model_policy(model: nn.Module, tokenizer: Tokenizer) -> Policy:
    """The greedy policy of `model` (argmax action) as the rollout evaluator calls it, run on an
    inference copy (adapters folded in): later changes to `model` do not reach the policy."""
    model = inference_copy(model)
    max_len = model.cfg.max_len
    device = device_of(model)
    encoded: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def policy(images: np.ndarray, directions: np.ndarray, missions: list[str]) -> np.ndarray:
        for m in missions:
            if m not in encoded:
                encoded[m] = np.asarray(tokenizer.encode(m, max_len), dtype=np.int64)
        tokens = torch.from_numpy(np.stack([encoded[m] for m in missions])).to(device)
        logits = model.act(tokens, torch.from_numpy(images).to(device), torch.from_numpy(directions).to(device))
        return logits.argmax(1).cpu().numpy()

    policy.memory = model.cfg.memory     # the rollout hands it that many past frames (kt_core.vln.memory)
    return policy


def evaluate_rollouts(model: nn.Module, tokenizer: Tokenizer, level: str, episodes: int,
                      cache_dir: str | Path | None = None, *, validation: bool = False) -> dict:
    """Success rate and SPL of the greedy policy on `episodes` unseen evaluation seeds of `level`
    (validation=True: on the validation block instead, for choosing hyper-parameters)."""
    seeds = validation_seeds(episodes) if validation else eval_seeds(episodes)
    return evaluate_policy(model_policy(model, tokenizer), level, seeds, cache_dir).summary()


def check_rollout_instructions(tokenizer: Tokenizer, max_len: int, levels: Sequence[str], episodes: int) -> None:
    """Every instruction the rollouts on `levels` will be given (the first `episodes` evaluation
    seeds) fits the backbone's max_len, else TokenizerError naming the level: the rollouts come at
    the end of a run, and a level whose instruction is refused there (BossLevel's reach 27 tokens,
    the demo backbone takes 24) would lose the run's evaluation after all its training."""
    if episodes < 1:
        return
    for level in levels:
        encode_missions(tokenizer, sorted(set(missions(level, eval_seeds(episodes)))), max_len, level)


def site_evaluation(model: nn.Module, tokenizer: Tokenizer, train_levels: Sequence[str],
                    held_out_levels: Sequence[str], episodes: int, cache_dir: str | Path | None = None) -> dict:
    """Rollouts on unseen seeds of the site's own levels and of levels no site trained on, with
    the means a round report needs."""
    own = {lv: evaluate_rollouts(model, tokenizer, lv, episodes, cache_dir) for lv in train_levels}
    held = {lv: evaluate_rollouts(model, tokenizer, lv, episodes, cache_dir) for lv in held_out_levels}

    def mean(results: dict, key: str) -> float | None:
        return float(np.mean([r[key] for r in results.values()])) if results else None

    return {"train_levels": own, "held_out_levels": held,
            "success_rate": mean(own, "success_rate"), "spl": mean(own, "spl"),
            "held_out_success_rate": mean(held, "success_rate"), "held_out_spl": mean(held, "spl")}
