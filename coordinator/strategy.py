"""Aggregation policy, independent of transport (in the spirit of Flower's `Strategy`).

A strategy folds updates into a running aggregate one at a time, so the coordinator never holds
every participant's update at once, and turns the aggregate into the next global state.
Updates are deltas of the shared tensors: `local_after_training - global_before`.

The coordinator hands FedAvg states and updates that live on disk (a state file, a spooled
upload): they are read block by block, so beside the accumulators only a block is in memory, and
`finish()` returns the new state as a lazy mapping that the store writes block by block. Given
plain arrays (tests, benchmarks), FedAvg takes and returns arrays as before.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Protocol

import numpy as np

from coordinator.store import state_blocks, state_layout

# elements per block when folding: the float64 temporaries stay at a few MiB
BLOCK_ELEMS = 1 << 18


class Strategy(Protocol):
    def begin(self, global_state: Mapping[str, np.ndarray]) -> None: ...
    def add(self, update: Mapping[str, np.ndarray], num_samples: int) -> None: ...
    def add_aggregate(self, weighted_sum: Mapping[str, np.ndarray], weight: int) -> None: ...
    def finish(self) -> Mapping[str, np.ndarray]: ...


class FedAvg:
    """Sample-weighted mean of the updates, applied with a server learning rate (1.0 = FedAvg)."""

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr
        self._global: Mapping[str, np.ndarray] = {}
        self._layout: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._sum: dict[str, np.ndarray] | None = None
        self._weight = 0

    def begin(self, global_state: Mapping[str, np.ndarray]) -> None:
        # A state that can be re-read block by block (a state file) is kept by reference; anything
        # else is taken as arrays, as before (a lazy FedAvgResult is computed once here, so rounds
        # do not chain their results).
        if hasattr(global_state, "blocks") and not isinstance(global_state, FedAvgResult):
            self._global = global_state
        else:
            self._global = {n: np.asarray(a) for n, a in global_state.items()}
        self._layout = state_layout(self._global)
        # float64 accumulators: summing many float32 updates would otherwise lose precision.
        self._sum = {n: np.zeros(shape, dtype=np.float64) for n, (_, shape) in self._layout.items()}
        self._weight = 0

    def _check(self, tensors: Mapping[str, np.ndarray], what: str) -> None:
        if self._sum is None:
            raise ValueError("no round in progress: call begin() first")
        if set(tensors) != set(self._sum):
            raise ValueError(f"{what} tensors differ from the global state's")

    def add(self, update: Mapping[str, np.ndarray], num_samples: int) -> None:
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        self._check(update, "update")
        layout = state_layout(update)
        for name, (_, shape) in layout.items():
            if tuple(shape) != tuple(self._layout[name][1]):
                raise ValueError(f"update tensor {name!r}: shape {list(shape)}, expected {list(self._layout[name][1])}")
        for name in update:
            _fold(self._sum[name], state_blocks(update, name, BLOCK_ELEMS), float(num_samples))
        self._weight += num_samples

    def add_aggregate(self, weighted_sum: Mapping[str, np.ndarray], weight: int) -> None:
        """Fold in updates that arrive already summed (secure aggregation): sum of weight_i * update_i."""
        if weight <= 0:
            raise ValueError("the aggregate's weight must be positive")
        self._check(weighted_sum, "aggregate")
        for name, total in weighted_sum.items():
            self._sum[name] += np.asarray(total, dtype=np.float64)
        self._weight += weight

    @property
    def count_weight(self) -> int:
        return self._weight

    def finish(self) -> Mapping[str, np.ndarray]:
        """The new global state. From a global state on disk: a FedAvgResult, computed block by
        block as the store writes it (the accumulators pass to it); from arrays: arrays."""
        if self._sum is None or self._weight == 0:
            raise ValueError("no updates to aggregate")
        result = FedAvgResult(self._global, self._layout, self._sum, self._weight, self.server_lr)
        self._sum = None  # a finished round holds no accumulators
        if isinstance(self._global, dict):
            return {name: result[name] for name in result}
        return result


def _fold(acc: np.ndarray, blocks: Iterator[np.ndarray], scale: float) -> None:
    """acc += float64(update) * scale, one block at a time (the same arithmetic as on whole arrays)."""
    flat = acc.reshape(-1)
    tmp = np.empty(min(BLOCK_ELEMS, flat.size), dtype=np.float64)
    start = 0
    for block in blocks:
        n = block.size
        if n > tmp.size:
            tmp = np.empty(n, dtype=np.float64)
        part = tmp[:n]
        part[...] = block.reshape(-1)
        part *= scale
        flat[start:start + n] += part
        start += n
    if start != flat.size:
        raise ValueError(f"update holds {start} elements, the aggregate {flat.size}")


class FedAvgResult(Mapping[str, np.ndarray]):
    """global + server_lr * sum / weight, per tensor in the global state's dtype. `blocks()` gives it
    piece by piece (the store writes it so); indexing computes a whole tensor."""

    def __init__(self, global_state, layout, sums, weight, server_lr):
        self._global = global_state
        self._layout = dict(layout)
        self._sums = sums
        self._weight = weight
        self._lr = server_lr

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return dict(self._layout)

    def blocks(self, name: str, block_elems: int | None = None) -> Iterator[np.ndarray]:
        dtype = np.dtype(self._layout[name][0])
        flat = self._sums[name].reshape(-1)
        start = 0
        for g in state_blocks(self._global, name, block_elems or BLOCK_ELEMS):
            n = g.size
            yield (g + self._lr * flat[start:start + n] / self._weight).astype(dtype)
            start += n

    def __getitem__(self, name: str) -> np.ndarray:
        g = np.asarray(self._global[name])
        return (g + self._lr * self._sums[name] / self._weight).astype(g.dtype)

    def __iter__(self):
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)
