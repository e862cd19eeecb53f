"""t-of-n Shamir secret sharing of 32-byte secrets over GF(p), p = 2^521 - 1 (a Mersenne prime).

A share is (x, y) with 1 <= x < 2^16 the holder's public index and 0 <= y < p. Any t shares
reconstruct the secret; t - 1 reveal nothing about it. Fewer than t shares are refused.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

from .errors import SecAggError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = 2 + Y_BYTES
MAX_X = (1 << 16) - 1


@dataclass(frozen=True)
class Share:
    x: int
    y: int

    def __post_init__(self):
        if not isinstance(self.x, int) or not 1 <= self.x <= MAX_X:
            raise SecAggError(f"share index must be in 1..{MAX_X}, got {self.x!r}")
        if not isinstance(self.y, int) or not 0 <= self.y < PRIME:
            raise SecAggError("share value out of the field")

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(2, "big") + self.y.to_bytes(Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Share":
        if not isinstance(data, (bytes, bytearray)) or len(data) != SHARE_BYTES:
            raise SecAggError(f"a share is {SHARE_BYTES} bytes, got "
                              f"{len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__}")
        return cls(int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big"))


def split(secret: bytes, xs: Sequence[int], t: int) -> dict[int, Share]:
    """Share `secret` (32 bytes) among holders with indices `xs` so that any t reconstruct it."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        raise SecAggError(f"a shared secret must be {SECRET_BYTES} bytes")
    xs = list(xs)
    if len(set(xs)) != len(xs):
        raise SecAggError("share indices must be distinct")
    if not 1 <= t <= len(xs):
        raise SecAggError(f"threshold t={t} must be in 1..{len(xs)} (the number of holders)")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        if not isinstance(x, int) or not 1 <= x <= MAX_X:
            raise SecAggError(f"share index must be in 1..{MAX_X}, got {x!r}")
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = Share(x, y)
    return out


@lru_cache(maxsize=256)
def _lagrange_coefficients(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """l_i(at) for the interpolation points xs. Cached: the server reconstructs every survivor's
    self-mask seed from the same responders, so a round needs one set of coefficients, not one per
    secret (O(t^2) multiplications and t inversions mod a 521-bit prime each: ~7 ms at t = 51).
    The denominators are inverted together (Montgomery's trick): one pow() instead of t."""
    nums, dens = [], []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        nums.append(num)
        dens.append(den)
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        out[i] = nums[i] * inv % PRIME * prefix[i] % PRIME
        inv = inv * dens[i] % PRIME
    return tuple(out)


def _lagrange_at(shares: Sequence[Share], at: int) -> int:
    coeffs = _lagrange_coefficients(tuple(s.x for s in shares), at)
    return sum(s.y * c for s, c in zip(shares, coeffs)) % PRIME


def reconstruct(shares: Iterable[Share], t: int, verify_extra: bool = False) -> bytes:
    """The 32-byte secret from at least t shares with distinct indices.

    With more than t shares and `verify_extra`, every extra share must lie on the polynomial
    through the first t (a wrong share is reported instead of silently giving a wrong secret).
    """
    shares = list(shares)
    if t < 1:
        raise SecAggError(f"threshold must be >= 1, got {t}")
    if len(shares) < t:
        raise SecAggError(f"refusing to reconstruct: {len(shares)} shares, threshold is {t}")
    if len({s.x for s in shares}) != len(shares):
        raise SecAggError("duplicate share indices")
    base = shares[:t]
    value = _lagrange_at(base, 0)
    if verify_extra:
        for extra in shares[t:]:
            if _lagrange_at(base, extra.x) != extra.y:
                raise SecAggError(f"inconsistent shares: share {extra.x} is not on the polynomial "
                                  f"of shares {[s.x for s in base]}")
    if value >= 1 << (8 * SECRET_BYTES):
        raise SecAggError("reconstructed value is not a 32-byte secret (wrong shares)")
    return value.to_bytes(SECRET_BYTES, "big")
