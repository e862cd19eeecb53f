"""What client and server must compute identically: round setup, derivations, mask signs.

Participant u's Shamir index is 1 + its position in the sorted roster (public, fixed per round).
Pairwise mask: u adds PRG(s_uv) when u < v and subtracts it when u > v, so each pair cancels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .config import SecAggProtocolSettings
from .errors import SecAggError
from .graph import graph_seed as default_graph_seed, neighbours
from .primitives import DOMAIN, agree, digest, pack, pair_info, public_bytes
from .wire import MAX_ID_CHARS

STEPS = ("advertise", "share_keys", "masked_input", "consistency", "unmask")


@dataclass(frozen=True)
class RoundSetup:
    """The public facts of one round, derived the same way on every side."""
    run_id: str
    round: int
    roster: tuple[str, ...]
    settings: SecAggProtocolSettings
    threshold: int
    graph: Mapping[str, frozenset]
    index: Mapping[str, int]

    @classmethod
    def create(cls, run_id: str, round_no: int, roster: Sequence[str], settings: SecAggProtocolSettings,
               graph_seed: Optional[bytes] = None) -> "RoundSetup":
        if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_ID_CHARS:
            raise SecAggError("run_id must be a non-empty string")
        if isinstance(round_no, bool) or not isinstance(round_no, int) or round_no < 0:
            raise SecAggError(f"round must be an integer >= 0, got {round_no!r}")
        if not isinstance(settings, SecAggProtocolSettings):
            raise SecAggError("settings must be a SecAggProtocolSettings")
        roster = tuple(sorted(roster))
        if len(set(roster)) != len(roster):
            raise SecAggError("roster lists a participant twice")
        for u in roster:
            if not isinstance(u, str) or not 0 < len(u) <= MAX_ID_CHARS:
                raise SecAggError(f"bad participant id {u!r}")
        if len(roster) > 65535:
            raise SecAggError("at most 65535 participants per round")
        settings.validate(len(roster))
        seed = default_graph_seed(run_id, round_no) if graph_seed is None else graph_seed
        if not isinstance(seed, bytes) or len(seed) < 16:
            raise SecAggError("graph_seed must be at least 16 bytes")
        return cls(run_id, round_no, roster, settings, settings.threshold_for(len(roster)),
                   neighbours(roster, settings.neighbours, seed),
                   {u: i + 1 for i, u in enumerate(roster)})

    def holders_of(self, u: str) -> frozenset:
        """Who holds shares of u's secrets: its neighbours and itself."""
        return self.graph[u] | {u}

    # ---- derivations
    def enc_key(self, private, peer_public: bytes, a: str, b: str) -> bytes:
        return agree(private, peer_public, pair_info("share-encryption", self.run_id, self.round, a, b))

    def mask_seed(self, private, peer_public: bytes, a: str, b: str) -> bytes:
        return agree(private, peer_public, pair_info("pairwise-mask", self.run_id, self.round, a, b))

    def share_aad(self, sender: str, receiver: str, state_hash: bytes) -> bytes:
        return pack(DOMAIN, "share-aad", sender, receiver, self.run_id, self.round, state_hash)

    def commitment(self, u: str, self_mask_seed: bytes) -> bytes:
        return digest("self-mask-commitment", self.run_id, self.round, u, self_mask_seed)


def pair_sign(u: str, v: str) -> int:
    """The sign with which u applies the pairwise mask it shares with v."""
    return 1 if u < v else -1


def check_public_key_matches(private, expected_public: bytes) -> bool:
    return public_bytes(private) == expected_public


def as_uint32_vector(vector, what: str) -> np.ndarray:
    arr = np.asarray(vector)
    if arr.ndim != 1 or arr.dtype != np.uint32:
        raise SecAggError(f"{what}: expected a 1-D uint32 vector (use quantize.encode_input), "
                          f"got {arr.dtype} with shape {arr.shape}")
    return arr
