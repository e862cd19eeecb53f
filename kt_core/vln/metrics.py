"""Exact R2R metrics on a viewpoint graph (Anderson et al. 2018; SPL: Anderson et al. 2018b).

For an episode with start s, goal g and the agent's trajectory p_0 = s, ..., p_T (viewpoints it
stood on, in order), with d(., .) the shortest-path distance along the graph's edges in metres:

    NE   navigation error        d(p_T, g)
    SR   success                 NE < 3 m
    OSR  oracle success          min_t d(p_t, g) < 3 m (it passed within 3 m of the goal)
    TL   trajectory length       sum_t |p_t - p_{t-1}|  (Euclidean length of the edges walked)
    SPL  success weighted by     SR * d(s, g) / max(TL, d(s, g))
         path length

as the R2R evaluation script computes them. Distances come from Dijkstra on the edge lengths.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

SUCCESS_DISTANCE_M = 3.0


class GraphError(ValueError):
    pass


class NavGraph:
    """An undirected navigation graph: viewpoints at 3-D positions (metres), edges weighted by
    the Euclidean distance between their ends."""

    def __init__(self, positions, edges: Iterable[tuple[int, int]]):
        pos = np.asarray(positions, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] == 0:
            raise GraphError(f"positions: must be V x 3 with V >= 1, got shape {pos.shape}")
        if not np.isfinite(pos).all():
            raise GraphError("positions: must be finite")
        self.positions = pos
        self.neighbours: list[dict[int, float]] = [{} for _ in range(len(pos))]
        for i, j in edges:
            i, j = int(i), int(j)
            if not (0 <= i < len(pos) and 0 <= j < len(pos)) or i == j:
                raise GraphError(f"edge ({i}, {j}): endpoints must be distinct viewpoints in 0..{len(pos) - 1}")
            w = float(np.linalg.norm(pos[i] - pos[j]))
            self.neighbours[i][j] = w
            self.neighbours[j][i] = w
        self._search_cache: dict[int, tuple[np.ndarray, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def edges(self) -> list[tuple[int, int]]:
        return [(i, j) for i, nb in enumerate(self.neighbours) for j in nb if i < j]

    def _search(self, source: int) -> tuple[np.ndarray, list[int]]:
        """Dijkstra from `source`: distances (inf where unreachable) and each viewpoint's
        predecessor on a shortest path (-1 for the source and the unreachable)."""
        if source not in self._search_cache:
            dist = np.full(len(self), math.inf)
            parent = [-1] * len(self)
            dist[source] = 0.0
            heap = [(0.0, source)]
            while heap:
                d, u = heapq.heappop(heap)
                if d > dist[u]:
                    continue
                for v, w in self.neighbours[u].items():
                    if d + w < dist[v]:
                        dist[v] = d + w
                        parent[v] = u
                        heapq.heappush(heap, (d + w, v))
            self._search_cache[source] = (dist, parent)
        return self._search_cache[source]

    def dijkstra(self, source: int) -> np.ndarray:
        """Shortest-path distances from `source` to every viewpoint (inf where unreachable)."""
        return self._search(source)[0]

    def distance(self, a: int, b: int) -> float:
        return float(self.dijkstra(a)[b])

    def shortest_path(self, a: int, b: int) -> list[int]:
        """The viewpoints of a shortest path from a to b, both included."""
        dist, parent = self._search(a)
        if math.isinf(dist[b]):
            raise GraphError(f"viewpoint {b} is not reachable from {a}")
        path = [b]
        while path[-1] != a:
            path.append(parent[path[-1]])
        return path[::-1]

    def path_length(self, path: Sequence[int]) -> float:
        """Euclidean length of a walk; consecutive viewpoints must be equal (stayed) or adjacent."""
        total = 0.0
        for a, b in zip(path[:-1], path[1:]):
            if a == b:
                continue
            if b not in self.neighbours[a]:
                raise GraphError(f"trajectory moves from {a} to {b}, which are not connected")
            total += self.neighbours[a][b]
        return total


@dataclass(frozen=True)
class EpisodeMetrics:
    nav_error: float
    success: float            # 0 or 1
    oracle_success: float     # 0 or 1
    trajectory_length: float
    spl: float
    shortest: float           # d(start, goal)


def episode_metrics(graph: NavGraph, trajectory: Sequence[int], goal: int,
                    threshold: float = SUCCESS_DISTANCE_M) -> EpisodeMetrics:
    if len(trajectory) == 0:
        raise GraphError("trajectory: must hold at least the start viewpoint")
    if not 0 <= goal < len(graph):
        raise GraphError(f"goal {goal} is not a viewpoint of the graph")
    to_goal = graph.dijkstra(goal)        # the graph is undirected: d(v, g) = d(g, v)
    shortest = float(to_goal[trajectory[0]])
    if math.isinf(shortest):
        raise GraphError(f"goal {goal} is not reachable from the start {trajectory[0]}")
    ne = float(to_goal[trajectory[-1]])
    success = float(ne < threshold)
    oracle = float(min(to_goal[p] for p in trajectory) < threshold)
    tl = graph.path_length(trajectory)
    if math.isclose(tl, shortest, rel_tol=1e-9, abs_tol=1e-12):
        # the same edges summed in another order (Dijkstra from the goal, the walk from the
        # start) differ in the last bit; a shortest walk must score SPL = 1 exactly
        tl = shortest
    # start == goal: shortest = 0 and TL = 0 give 0 / 0; a success that needed no walking is 1
    spl = success * (shortest / max(tl, shortest) if max(tl, shortest) > 0 else 1.0)
    return EpisodeMetrics(ne, success, oracle, tl, spl, shortest)


def summarize(results: Sequence[EpisodeMetrics]) -> dict[str, float]:
    """Means over episodes, under the names R2R papers report."""
    if not results:
        raise ValueError("summarize: no episodes")
    mean = lambda key: float(np.mean([asdict(r)[key] for r in results]))  # noqa: E731
    return {"episodes": len(results), "NE": mean("nav_error"), "SR": mean("success"),
            "OSR": mean("oracle_success"), "TL": mean("trajectory_length"), "SPL": mean("spl")}
