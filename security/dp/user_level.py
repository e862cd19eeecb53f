"""User-level DP for federations: each site's whole update is clipped, then noise is added.

Guarantees (one "user" = one site, adjacency = adding or removing a whole site's data):

* central (DP-FedAvg, McMahan et al. ICLR 2018): each site clips its update to L2 norm S
  (`clip_update`); the coordinator averages with equal weights and adds N(0, (z S / n)^2) to the
  mean (`central_noise_std`). With every site taking part each round (sampling rate 1), R rounds
  give the R-fold composition of the Gaussian mechanism with noise multiplier z. The coordinator
  sees each site's clipped update in the clear: this protects against whoever sees the *model*
  (other sites, model users), not against the coordinator itself.

* distributed: each site adds its own share of the noise, N(0, (z S)^2 / t) per coordinate
  (`distributed_share_std`), before its update is masked by secure aggregation; any t honest
  survivors together contribute noise of variance (z S)^2, the same as the central mechanism, and
  the coordinator learns only the sum. This guarantee holds **only when SecAgg is on** (the
  coordinator must never see an individual update) and at least t honest sites survive. Without
  SecAgg an individual update carries only its own share: its guarantee against the coordinator is
  the Gaussian mechanism with noise multiplier z / sqrt(t), far weaker.

Noise comes from numpy's PCG64 seeded with 128 bits of OS entropy.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np

from security.dp.accounting import RoundSpend


def _rng() -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update.values()))


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update (all tensors together) to L2 norm at most clip_norm; returns the norm before."""
    if not clip_norm > 0:
        raise ValueError("clip_norm must be > 0")
    norm = update_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: (np.asarray(a) * factor).astype(np.asarray(a).dtype) for n, a in update.items()}, norm


def central_noise_std(noise_multiplier: float, clip_norm: float, contributors: int) -> float:
    """Std of the Gaussian noise on the equal-weight mean of `contributors` clipped updates."""
    if contributors < 1:
        raise ValueError("contributors must be >= 1")
    return noise_multiplier * clip_norm / contributors


def distributed_share_std(noise_multiplier: float, clip_norm: float, min_survivors: int) -> float:
    """Std of one site's noise share, so that any `min_survivors` shares sum to std z * S."""
    if min_survivors < 1:
        raise ValueError("min_survivors must be >= 1")
    return noise_multiplier * clip_norm / math.sqrt(min_survivors)


def add_gaussian_noise(state: Mapping[str, np.ndarray], std: float) -> dict[str, np.ndarray]:
    rng = _rng()
    return {n: (np.asarray(a, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(a))).astype(np.asarray(a).dtype)
            for n, a in state.items()}


def user_level_spend(noise_multiplier: float, rounds: int = 1, sample_rate: float = 1.0) -> RoundSpend:
    """What `rounds` rounds of DP-FedAvg spend at the user level (every site selected: q = 1)."""
    return RoundSpend(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=rounds)
