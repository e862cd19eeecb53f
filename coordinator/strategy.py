"""Aggregation policy, independent of transport (in the spirit of Flower's `Strategy`).

A strategy folds updates into a running aggregate one at a time, so the coordinator never holds
every participant's update at once, and turns the aggregate into the next global state.
Updates are deltas of the shared tensors: `local_after_training - global_before`.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np


class Strategy(Protocol):
    def begin(self, global_state: Mapping[str, np.ndarray]) -> None: ...
    def add(self, update: Mapping[str, np.ndarray], num_samples: int) -> None: ...
    def add_aggregate(self, weighted_sum: Mapping[str, np.ndarray], weight: int) -> None: ...
    def finish(self) -> dict[str, np.ndarray]: ...


class FedAvg:
    """Sample-weighted mean of the updates, applied with a server learning rate (1.0 = FedAvg)."""

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr
        self._global: dict[str, np.ndarray] = {}
        self._sum: dict[str, np.ndarray] = {}
        self._weight = 0

    def begin(self, global_state: Mapping[str, np.ndarray]) -> None:
        self._global = {n: np.asarray(a) for n, a in global_state.items()}
        # float64 accumulators: summing many float32 updates would otherwise lose precision.
        self._sum = {n: np.zeros(a.shape, dtype=np.float64) for n, a in self._global.items()}
        self._weight = 0

    def add(self, update: Mapping[str, np.ndarray], num_samples: int) -> None:
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        if set(update) != set(self._sum):
            raise ValueError("update tensors differ from the global state's")
        for name, delta in update.items():
            self._sum[name] += np.asarray(delta, dtype=np.float64) * num_samples
        self._weight += num_samples

    def add_aggregate(self, weighted_sum: Mapping[str, np.ndarray], weight: int) -> None:
        """Fold in updates that arrive already summed (secure aggregation): sum of weight_i * update_i."""
        if weight <= 0:
            raise ValueError("the aggregate's weight must be positive")
        if set(weighted_sum) != set(self._sum):
            raise ValueError("aggregate tensors differ from the global state's")
        for name, total in weighted_sum.items():
            self._sum[name] += np.asarray(total, dtype=np.float64)
        self._weight += weight

    @property
    def count_weight(self) -> int:
        return self._weight

    def finish(self) -> dict[str, np.ndarray]:
        if self._weight == 0:
            raise ValueError("no updates to aggregate")
        return {name: (g + self.server_lr * self._sum[name] / self._weight).astype(g.dtype)
                for name, g in self._global.items()}
