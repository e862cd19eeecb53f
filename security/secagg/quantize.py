"""Fixed-point encoding of float updates into Z_{2^32}, and back for the sum.

Encoding one update x (float vector) with clip norm C and `bits` fractional bits:
  1. clip the whole vector in L2: x <- x * min(1, C / ||x||_2)       (not per element)
  2. scale to fixed point: z = x * 2^bits, so |z_i| <= C * 2^bits
  3. unbiased stochastic rounding: q_i = floor(z_i) + Bernoulli(z_i - floor(z_i)),  E[q_i] = z_i
  4. two's complement into Z_{2^32}.
The sample count rides as one extra, unscaled, unsigned element at the end.

Capacity: each |q_i| <= ceil(C * 2^bits), so the sum of n inputs decodes without wrap-around iff
n * ceil(C * 2^bits) <= 2^31 - 1 (`check_capacity`); the count sum needs n * max_count < 2^32.

Error bound (stated, deterministic): each |q_i - z_i| < 1, so for every coordinate
|dequantized sum - sum of clipped inputs| < n * 2^-bits  (`error_bound`); E[error] = 0.
"""
from __future__ import annotations

import math
import secrets

import numpy as np

from .errors import SecAggError

MODULUS_BITS = 32
MAX_SIGNED = (1 << 31) - 1
MAX_BITS = 30


def _check_params(clip: float, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_BITS:
        raise SecAggError(f"bits must be an integer in 0..{MAX_BITS}, got {bits!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
        raise SecAggError(f"clip_norm must be a finite number > 0, got {clip!r}")


def max_level(clip: float, bits: int) -> int:
    """The largest |q_i| one encoded input can hold."""
    _check_params(clip, bits)
    return math.ceil(clip * (1 << bits))


def check_capacity(n: int, clip: float, bits: int) -> None:
    """Refuse a configuration whose sum of n inputs could overflow the signed range of Z_{2^32}."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SecAggError(f"number of inputs must be an integer >= 1, got {n!r}")
    level = max_level(clip, bits)
    if n * level > MAX_SIGNED:
        raise SecAggError(
            f"overflow-prone configuration: {n} inputs x clip_norm {clip} x 2^{bits} "
            f"(= {n * level:.3g}) exceeds 2^31 - 1; lower clip_norm or bits, or use fewer participants")


def max_count(n: int) -> int:
    """The largest sample count one input may carry so that n counts sum below 2^32."""
    return ((1 << MODULUS_BITS) - 1) // max(n, 1)


def error_bound(n: int, bits: int) -> float:
    """Per-coordinate bound on |dequantized sum - float sum of the clipped inputs|."""
    return n / float(1 << bits)


def clip_l2(x, clip: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise SecAggError("update contains NaN or infinite values")
    norm = float(np.linalg.norm(x))
    if norm > clip:
        x = x * (clip / norm)
    return x


def _rng(rng) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng(secrets.randbits(128))
    if isinstance(rng, np.random.Generator):
        return rng
    raise SecAggError("rng must be a numpy Generator or None")


def quantize(x, clip: float, bits: int, rng=None) -> np.ndarray:
    """Clip, scale and stochastically round `x` into uint32 (two's complement)."""
    level = max_level(clip, bits)
    z = clip_l2(x, clip) * float(1 << bits)
    low = np.floor(z)
    q = low + (_rng(rng).random(z.shape) < (z - low))
    q = np.clip(q, -level, level)  # guards float rounding in the clip; never binds otherwise
    return q.astype(np.int64).astype(np.uint32)


def dequantize(total: np.ndarray, bits: int) -> np.ndarray:
    """A sum of quantized inputs (uint32, mod 2^32) back to floats."""
    total = np.asarray(total)
    if total.dtype != np.uint32:
        raise SecAggError(f"expected a uint32 vector, got {total.dtype}")
    return total.view(np.int32).astype(np.float64) / float(1 << bits)


def encode_input(update, count: int, clip: float, bits: int, n: int, rng=None) -> np.ndarray:
    """One participant's input: quantized update followed by its sample count (length m + 1)."""
    check_capacity(n, clip, bits)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= max_count(n):
        raise SecAggError(f"sample count must be an integer in 0..{max_count(n)} for {n} inputs, got {count!r}")
    q = quantize(update, clip, bits, rng)
    return np.concatenate([q, np.array([int(count)], dtype=np.uint32)])


def decode_sum(total: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """The float sum of the updates and the total sample count from an aggregated vector."""
    total = np.asarray(total)
    if total.ndim != 1 or total.shape[0] < 1:
        raise SecAggError("aggregate must be a non-empty 1-D vector")
    return dequantize(total[:-1], bits), int(total[-1])
