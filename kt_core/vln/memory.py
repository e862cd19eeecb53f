"""The backbone's memory: the last `memory` steps of an episode, as the model sees them.

BabyAI is partially observable: an object seen three steps ago may be out of view now, and a
reactive policy that sees one frame turns left and right forever in front of a wall. BabyAI's own
agents carry an LSTM state, and recurrent VLN-BERT carries a state token from step to step. This
backbone carries the shortest form of that memory that still batches by step: the past `memory`
frames of the episode (egocentric grid and facing direction) and the action taken at each of
them. Training keeps shuffling single steps (the history of a step is read from the steps before
it in the same episode), and rollouts keep the same history per environment with
`RolloutHistory`, so what the model is trained on and what it meets in the environment are built
by the same function, `stack_frames`.

With memory, a grid observation is a stack of frames and the pose a stack of (direction, action):

    observation  B x (1 + M) x 7 x 7 x 3    frame 0 is the current view, frame j the view j steps back
    pose         B x (1 + M) x 2            (direction, action taken at that frame); frame 0's
                                             action is unknown and ignored
    a past frame that precedes the episode's start has action EMPTY (= num_actions) and is masked
    out of attention: the first step of an episode sees no history at all
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def empty_action(num_actions: int) -> int:
    """The action value that marks a past frame before the episode's start."""
    return num_actions


def stack_frames(images: Tensor, directions: Tensor, actions: Tensor, steps: Tensor, idx: Tensor,
                 memory: int, num_actions: int) -> tuple[Tensor, Tensor]:
    """The observations and poses of samples `idx` with their `memory` previous steps.

    images / directions / actions / steps: one row per sample, the samples of an episode
    contiguous and in order, `steps[i]` the position of sample i in its episode (0 at its start).
    So the frame j steps before sample i is sample i - j, when j <= steps[i]."""
    back = torch.arange(memory + 1, device=idx.device)                   # 0, 1, ..., M
    rows = idx[:, None] - back[None, :]                                   # B x (1 + M)
    valid = back[None, :] <= steps[idx][:, None]
    rows = torch.where(valid, rows, idx[:, None])                          # any in-range row; masked below
    obs = images[rows]
    obs = torch.where(valid[..., None, None, None], obs, torch.zeros_like(obs))
    acted = torch.where(valid, actions[rows], torch.full_like(rows, empty_action(num_actions)))
    acted[:, 0] = 0                                                        # the current action is what is predicted
    pose = torch.stack([torch.where(valid, directions[rows], torch.zeros_like(rows)), acted], dim=-1)
    return obs, pose


def episode_steps(episode: np.ndarray) -> np.ndarray:
    """Position of each sample in its episode, for samples laid out episode by episode."""
    episode = np.asarray(episode)
    if episode.size == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.r_[True, episode[1:] != episode[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(len(episode)), 0))
    return (np.arange(len(episode)) - first).astype(np.int64)


class RolloutHistory:
    """The last `memory` frames and actions of each environment slot of a batched rollout."""

    def __init__(self, slots: int, memory: int, num_actions: int, view: int = 7):
        self.memory, self.num_actions = memory, num_actions
        self.images = np.zeros((slots, memory, view, view, 3), dtype=np.uint8)
        self.directions = np.zeros((slots, memory), dtype=np.int64)
        self.actions = np.full((slots, memory), empty_action(num_actions), dtype=np.int64)

    def reset(self, slot: int) -> None:
        self.images[slot] = 0
        self.directions[slot] = 0
        self.actions[slot] = empty_action(self.num_actions)

    def stack(self, slots: list[int], images: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The policy's input for `slots`, whose current views are `images` / `directions`."""
        obs = np.concatenate([images[:, None], self.images[slots]], axis=1)
        current = np.stack([directions, np.zeros_like(directions)], axis=-1)[:, None]
        past = np.stack([self.directions[slots], self.actions[slots]], axis=-1)
        return obs, np.concatenate([current, past], axis=1)

    def push(self, slot: int, image: np.ndarray, direction: int, action: int) -> None:
        """Record that `action` was taken in view (`image`, `direction`): the newest past frame."""
        self.images[slot] = np.roll(self.images[slot], 1, axis=0)
        self.directions[slot] = np.roll(self.directions[slot], 1)
        self.actions[slot] = np.roll(self.actions[slot], 1)
        self.images[slot, 0], self.directions[slot, 0], self.actions[slot, 0] = image, direction, action


def history_mask(pose: Tensor, num_actions: int) -> Tensor:
    """B x M: True where a past frame exists (the frame's action is not EMPTY)."""
    return pose[:, 1:, 1] != empty_action(num_actions)
