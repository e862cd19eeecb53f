"""SecAgg+ neighbour graphs (Bell et al., CCS 2020).

Participants are placed on a ring in a random order derived from a public seed, and each is
joined to its k nearest on the ring (k/2 each side; for odd k, also the one diametrically
opposite): a Harary graph H(k, n) under a random relabelling. The graph is symmetric and every
node has degree exactly k (k + 1 when k and n are both odd: no k-regular graph exists then).
With k = 0 or k >= n - 1 the graph is complete. Each participant then agrees masks and shares
secrets only with its neighbours, so its cost grows with k (O(log n) in SecAgg+), not with n.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

from .errors import SecAggError
from .primitives import pack

Graph = Mapping[str, frozenset]


def effective_degree(n: int, k: int) -> int:
    """The degree each node gets: n - 1 for a complete graph, else k (k + 1 if k*n is odd)."""
    if k < 0:
        raise SecAggError(f"neighbours must be >= 0, got {k}")
    if k == 0 or k >= n - 1:
        return max(n - 1, 0)
    return k + 1 if (k % 2 and n % 2) else k


def graph_seed(run_id: str, round_no: int) -> bytes:
    """The default public seed for one round's graph."""
    return hashlib.sha256(pack(b"ktfed-secagg-graph", run_id, round_no)).digest()


def neighbours(ids: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset]:
    """Each participant's neighbour set (never itself) for a round of participants `ids`."""
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise SecAggError("participant ids must be distinct")
    n = len(ids)
    degree = effective_degree(n, k)
    if degree >= n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    ring = sorted(ids, key=lambda u: hashlib.sha256(pack(b"ring", seed, u)).digest())
    adj: dict[str, set] = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for d in range(1, degree // 2 + 1):
            for v in (ring[(i + d) % n], ring[(i - d) % n]):
                adj[u].add(v)
                adj[v].add(u)
        if degree % 2:  # n is even here
            v = ring[(i + n // 2) % n]
            adj[u].add(v)
            adj[v].add(u)
    return {u: frozenset(vs) for u, vs in adj.items()}
