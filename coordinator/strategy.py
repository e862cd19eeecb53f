"""Aggregation policy, independent of transport and of the store (in the spirit of Flower's `Strategy`).

A strategy decides, per round, who takes part and with which training settings, how much each
update weighs, and how the aggregate becomes the next global state. It folds updates into a running
aggregate one at a time, so the coordinator never holds every participant's update at once.
Updates are deltas of the shared tensors: `local_after_training - global_before`.

`FedAvg` is the sample-weighted mean; `DPFedAvg` wraps it for user-level DP-FedAvg (equal weights,
central Gaussian noise, the user-level epsilon of each round). The round engine records what the
strategy reports; the strategy writes nothing itself.

The coordinator hands FedAvg states and updates that live on disk (a state file, a spooled
upload): they are read block by block (coordinator.state_file.LazyState), so beside the
accumulators only a block is in memory, and `finish()` returns the new state as a lazy mapping that
the store writes block by block. Given plain arrays (tests, benchmarks), FedAvg takes and returns
arrays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Protocol

import numpy as np

from coordinator.state_file import LazyState, state_blocks, state_layout
from kt_core.config import RunConfig
from security.dp import accounting as dp_accounting
from security.dp import user_level

# elements per block when folding: the float64 temporaries stay at a few MiB
BLOCK_ELEMS = 1 << 18
# a round's training seed: the run's seed and the round, never the same for two rounds
SEED_STRIDE = 100_003


@dataclass(frozen=True)
class TrainPlan:
    """What every selected site is asked to do in one round."""

    epochs: int
    batch_size: int
    lr: float
    max_steps: int      # 0 = no limit
    seed: int


@dataclass(frozen=True)
class PrivacyRound:
    """User-level DP of one completed round, as the auditor recomputes it."""

    mechanism: str
    noise_multiplier: float
    clip_norm: float
    contributors: int
    noise_std: float
    delta: float
    epsilon_prv: float          # cumulative, all rounds so far
    epsilon_rdp: float
    epsilon_round_prv: float    # this round's share of epsilon_prv
    accountant_version: str


@dataclass(frozen=True)
class Folded:
    """What `add` did with one update: the weight it counted, the update's L2 norm as received
    (None for an unbounded mean, which does not measure it) and the factor it was scaled by (1.0
    within max_update_norm), for the round's record."""

    weight: int
    norm: float | None
    factor: float


class Strategy(Protocol):
    def select(self, connected: Iterable[str], round_no: int) -> frozenset[str]: ...
    def configure(self, round_no: int) -> TrainPlan: ...
    def weight(self, num_samples: int) -> int: ...
    def max_weight(self) -> int: ...
    def begin(self, global_state: Mapping[str, np.ndarray]) -> None: ...
    def add(self, update: Mapping[str, np.ndarray], weight: int) -> Folded: ...
    def add_aggregate(self, weighted_sum: Mapping[str, np.ndarray], weight: int) -> None: ...
    def finish(self) -> Mapping[str, np.ndarray]: ...
    def privacy_round(self, round_no: int) -> PrivacyRound | None: ...


def strategy_for(config: RunConfig) -> Strategy:
    """The run's strategy: FedAvg, wrapped in DPFedAvg under user-level DP."""
    fed = config.federation
    base = FedAvg(fed.server_lr, max_sites=fed.max_sites, train=config.train, seed=fed.seed,
                  max_weight=config.max_weight(), max_update_norm=config.max_update_norm())
    p = config.privacy
    if p.enabled and p.mechanism in ("central", "distributed"):
        return DPFedAvg(base, mechanism=p.mechanism, noise_multiplier=p.user_noise_multiplier, clip_norm=p.update_clip_norm,
                        delta=p.delta)
    return base


class FedAvg:
    """Sample-weighted mean of the updates, applied with a server learning rate (1.0 = FedAvg).

    `max_weight` and `max_update_norm` bound what one update can do to the mean (the run's
    RunConfig.max_weight and max_update_norm; None: unbounded, for plain means in tests and
    benchmarks): it weighs min(N, max_weight), and an update whose whole L2 norm exceeds
    max_update_norm is scaled down to it before it is folded in. Secure aggregation applies the
    same rule at the sites, so the mean is the same with or without masking; here the coordinator
    applies it, so it holds whatever a site claims or sends."""

    def __init__(self, server_lr: float = 1.0, *, max_sites: int | None = None, train=None, seed: int = 0,
                 max_weight: int | None = None, max_update_norm: float | None = None):
        if max_weight is not None and max_weight < 1:
            raise ValueError("max_weight must be a positive integer")
        if max_update_norm is not None and not (math.isfinite(max_update_norm) and max_update_norm > 0):
            raise ValueError("max_update_norm must be a finite number > 0")
        self.server_lr = server_lr
        self.max_sites = max_sites
        self.train = train            # kt_core.config.TrainSettings, for configure()
        self.seed = seed
        # the run config's rule, which the sites read too: both sides of a masked sum must agree
        # on it, so neither decides it alone
        self._max_weight = max_weight
        self.max_update_norm = max_update_norm
        self._global: Mapping[str, np.ndarray] = {}
        self._layout: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._sum: dict[str, np.ndarray] | None = None
        self._weight = 0

    # -- per round -----------------------------------------------------------------------------
    def select(self, connected: Iterable[str], round_no: int) -> frozenset[str]:
        """Every connected site, up to max_sites, in name order."""
        return frozenset(sorted(connected)[: self.max_sites])

    def configure(self, round_no: int) -> TrainPlan:
        t = self.train
        return TrainPlan(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, max_steps=t.max_steps or 0,
                         seed=self.seed * SEED_STRIDE + round_no)

    def weight(self, num_samples: int) -> int:
        """An update weighs its sample count, at most max_weight."""
        return num_samples if self._max_weight is None else min(num_samples, self._max_weight)

    def max_weight(self) -> int:
        """Under secure aggregation a site weighs its update by min(N, M) / M and carries min(N, M)
        as its hidden count (M = this; 1 where no bound was set)."""
        return 1 if self._max_weight is None else self._max_weight

    def privacy_round(self, round_no: int) -> PrivacyRound | None:
        return None

    # -- folding -------------------------------------------------------------------------------
    def begin(self, global_state: Mapping[str, np.ndarray]) -> None:
        # A state that can be re-read block by block (a state file, a spooled update) is kept by
        # reference; anything else is taken as arrays (a lazy FedAvgResult is computed once here,
        # so rounds do not chain their results).
        if isinstance(global_state, LazyState) and not isinstance(global_state, FedAvgResult):
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

    def add(self, update: Mapping[str, np.ndarray], weight: int) -> Folded:
        """Fold one update in with `weight`, clipped to max_update_norm; says what was folded."""
        if weight <= 0:
            raise ValueError("num_samples must be positive")
        self._check(update, "update")
        layout = state_layout(update)
        for name, (_, shape) in layout.items():
            if tuple(shape) != tuple(self._layout[name][1]):
                raise ValueError(f"update tensor {name!r}: shape {list(shape)}, expected {list(self._layout[name][1])}")
        # the norm pass only where there is a bound to hold it to (an unbounded mean, as the
        # benchmarks' simulations fold thousands of, needs none)
        norm, factor = None, 1.0
        if self.max_update_norm is not None:
            norm = update_norm(update)
            if norm > self.max_update_norm:
                factor = self.max_update_norm / norm
        for name in update:
            _fold(self._sum[name], state_blocks(update, name, BLOCK_ELEMS), float(weight) * factor)
        self._weight += weight
        return Folded(weight, norm, factor)

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


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of a whole update (every tensor together), read block by block in float64."""
    total = 0.0
    tmp = np.empty(BLOCK_ELEMS, dtype=np.float64)
    for name in update:
        for block in state_blocks(update, name, BLOCK_ELEMS):
            if block.size > tmp.size:
                tmp = np.empty(block.size, dtype=np.float64)
            part = tmp[:block.size]
            part[...] = block.reshape(-1)
            # elementwise, not np.dot: BLAS would spin up its threads beside the server's (15x
            # slower than the fold on a busy host)
            np.multiply(part, part, out=part)
            total += float(part.sum())
    return math.sqrt(total)


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


class DPFedAvg:
    """User-level DP-FedAvg around a FedAvg (McMahan et al. 2018): every site weighs the same, so
    one site's clipped update moves the mean by at most S/n; in "central" mode the coordinator adds
    N(0, (z S / n)^2) to the mean (times the server lr, as the mean is); in "distributed" mode the
    sites added their noise shares and nothing is added here. Either way each round's user-level
    epsilon is reported for the record."""

    def __init__(self, inner: FedAvg, *, mechanism: str, noise_multiplier: float, clip_norm: float, delta: float):
        if mechanism not in ("central", "distributed"):
            raise ValueError(f"DPFedAvg: mechanism {mechanism!r} is neither central nor distributed")
        self.inner = inner
        self.mechanism = mechanism
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.delta = delta
        self._std = 0.0

    def select(self, connected: Iterable[str], round_no: int) -> frozenset[str]:
        return self.inner.select(connected, round_no)

    def configure(self, round_no: int) -> TrainPlan:
        return self.inner.configure(round_no)

    def weight(self, num_samples: int) -> int:
        return 1

    def max_weight(self) -> int:
        # 1 under user-level DP (RunConfig.max_weight): equal weights, as the sensitivity
        # analysis assumes
        return self.inner.max_weight()

    def begin(self, global_state: Mapping[str, np.ndarray]) -> None:
        self.inner.begin(global_state)

    def add(self, update: Mapping[str, np.ndarray], weight: int) -> Folded:
        return self.inner.add(update, weight)

    def add_aggregate(self, weighted_sum: Mapping[str, np.ndarray], weight: int) -> None:
        self.inner.add_aggregate(weighted_sum, weight)

    def finish(self) -> Mapping[str, np.ndarray]:
        # every contributor weighs 1 (a SecAgg survivor carries min(N, 1) = 1): the weight is n
        self._contributors = self.inner.count_weight
        new_state = self.inner.finish()
        self._std = 0.0
        if self.mechanism == "central":
            self._std = user_level.central_noise_std(self.noise_multiplier, self.clip_norm,
                                                     self._contributors) * self.inner.server_lr
            new_state = user_level.add_gaussian_noise(new_state, self._std)
        return new_state

    def privacy_round(self, round_no: int) -> PrivacyRound:
        """The user-level epsilon after `round_no` rounds, for the round `finish()` just closed."""
        z, delta = self.noise_multiplier, self.delta
        eps = dp_accounting.epsilons([user_level.user_level_spend(z, round_no)], delta)
        before = dp_accounting.epsilons([user_level.user_level_spend(z, round_no - 1)], delta)["prv"] \
            if round_no > 1 else 0.0
        return PrivacyRound(self.mechanism, z, self.clip_norm, self._contributors, self._std, delta, eps["prv"],
                            eps["rdp"], eps["prv"] - before, dp_accounting.accountant_version())
