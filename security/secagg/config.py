"""The protocol's settings (`SecAggProtocolSettings`), with validation that names the field, and
the one bridge from a run config's `[secagg]` section (kt_core.config.SecAggConfig) to them."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .errors import SecAggError
from .graph import effective_degree
from .quantize import MAX_BITS, check_capacity


@dataclass(frozen=True)
class SecAggProtocolSettings:
    """
    enabled     run rounds under secure aggregation
    threshold   Shamir threshold t: shares needed to recover a secret, and the fewest survivors a
                round may unmask with. 0 = automatic (the smallest strict majority of the holders,
                i.e. floor(h/2) + 1 where h = holders(n)); an explicit t must be a strict majority
                of the holders and at most h.
    neighbours  SecAgg+ neighbour count k; 0 (or k >= n - 1) = complete graph (plain SecAgg)
    clip_norm   L2 clip of each whole update before encoding
    bits        fractional bits of the fixed-point encoding (resolution 2^-bits)
    active      active-adversary option: signed key advertisements and signed consistency acks
    """
    enabled: bool = True
    threshold: int = 0
    neighbours: int = 0
    clip_norm: float = 10.0
    bits: int = 16
    active: bool = False

    # ------------------------------------------------------------------ derived
    def degree(self, n: int) -> int:
        return effective_degree(n, self.neighbours)

    def holders(self, n: int) -> int:
        """How many participants hold shares of one participant's secrets (its neighbours + itself)."""
        return self.degree(n) + 1

    def threshold_for(self, n: int) -> int:
        return self.threshold if self.threshold else self.holders(n) // 2 + 1

    # ------------------------------------------------------------------ validation
    def validate(self, n: int) -> "SecAggProtocolSettings":
        """Check the settings for a round of n participants; raise SecAggError naming the field."""
        for name in ("enabled", "active"):
            if not isinstance(getattr(self, name), bool):
                raise SecAggError(f"secagg.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("threshold", "neighbours", "bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SecAggError(f"secagg.{name} must be an integer, got {value!r}")
        c = self.clip_norm
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
            raise SecAggError(f"secagg.clip_norm must be a finite number > 0, got {c!r}")
        if not 0 <= self.bits <= MAX_BITS:
            raise SecAggError(f"secagg.bits must be in 0..{MAX_BITS}, got {self.bits}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise SecAggError(f"secure aggregation needs at least 2 participants, got {n!r}")
        if self.neighbours < 0:
            raise SecAggError(f"secagg.neighbours must be >= 0 (0 = complete graph), got {self.neighbours}")
        if self.neighbours == 1 and n > 2:
            raise SecAggError("secagg.neighbours must be 0 (complete graph) or >= 2; "
                              "1 would pair participants off")
        h = self.holders(n)
        t = self.threshold
        if t < 0:
            raise SecAggError(f"secagg.threshold must be >= 0 (0 = automatic), got {t}")
        if t:
            if t > h:
                raise SecAggError(f"secagg.threshold t={t} exceeds the {h} holders of each secret "
                                  f"({n} participants, neighbours={self.neighbours})")
            if 2 * t <= h or t < 2:
                raise SecAggError(f"secagg.threshold t={t} is too small: it must be a strict majority "
                                  f"of the {h} holders of each secret (t >= {h // 2 + 1}), or the "
                                  "coordinator could recover both secrets of one participant")
        try:
            check_capacity(n, float(c), self.bits)
        except SecAggError as err:
            raise SecAggError(f"secagg.clip_norm/bits: {err}") from None
        return self

    # ------------------------------------------------------------------ config I/O
    @classmethod
    def from_section(cls, section: Any) -> "SecAggProtocolSettings":
        """The protocol's part of a run config's `[secagg]` section (kt_core.config.SecAggConfig).
        Read by attribute, since security does not import kt_core (DESIGN layering); the section's
        other fields (weighting, step timeouts) are the services' business, not the protocol's."""
        values = {f.name: getattr(section, f.name) for f in fields(cls)}
        values["clip_norm"] = float(values["clip_norm"])   # a TOML integer is still a norm
        return cls(**values)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "SecAggProtocolSettings":
        """From a run config table (e.g. [secagg] in TOML); unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise SecAggError("secagg settings must be a table")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SecAggError(f"unknown secagg setting(s): {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        return cls(**dict(data))

    def to_dict(self) -> dict:
        return asdict(self)
