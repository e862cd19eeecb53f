"""A seeded generator of R2R-shaped episodes (no Matterport data can be downloaded here).

A scan is a navigation graph of viewpoints in metres (a house floor: points at least 1.5 m apart
in a square, edges between near neighbours), each viewpoint standing next to a landmark (sofa,
lamp, ...). An agent standing at a viewpoint with heading h sees a 36-view panorama, as in R2R:
views k = 12 e + i look at relative heading i * 30 deg and elevation (-30, 0, +30) deg for
e = 0, 1, 2. A view's feature is what lies that way: landmark embeddings of the viewpoints in
that direction, weighted by alignment and distance (the level row), the agent's own landmark (the
down row), plus noise; its angle feature is (sin, cos) of the relative heading and elevation.
An episode is a shortest path of 3..5 hops between two viewpoints with a templated instruction
("walk past the sofa, turn left at the lamp and stop next to the piano.").

Actions: view k (0..35) moves to the neighbour whose bearing is closest to that view's heading
(within 30 deg, else the agent stays), 36 stops. Edges are built so that no two neighbours of a
viewpoint are within 30 deg of each other: each neighbour then has a view that reaches it, and
the teacher action (toward the next hop of the shortest path) is always exact.
Everything is a pure function of (seed, R2RConfig).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kt_core.vln.metrics import EpisodeMetrics, NavGraph, episode_metrics

LANDMARKS = ("sofa", "table", "lamp", "plant", "bed", "sink", "stairs", "chair", "fireplace", "piano",
             "painting", "rug", "mirror", "bookshelf", "window", "bathtub")
N_HEADINGS, ELEVATIONS = 12, (-math.pi / 6, 0.0, math.pi / 6)
N_VIEWS = N_HEADINGS * len(ELEVATIONS)
STOP = N_VIEWS                      # action 36
NUM_ACTIONS = N_VIEWS + 1
LEVEL_ROW = 1                       # views 12..23 look straight ahead, left and right
MIN_NEIGHBOUR_ANGLE = math.radians(30)
CAMERA_HEIGHT_M = 1.5


@dataclass(frozen=True)
class R2RConfig:
    n_viewpoints: int = 30
    area_m: float = 20.0
    min_spacing_m: float = 1.5
    edge_radius_m: float = 5.0
    feature_dim: int = 32
    visibility_m: float = 8.0
    noise: float = 0.05
    min_hops: int = 3
    max_hops: int = 5

    def validate(self) -> None:
        if self.n_viewpoints < self.max_hops + 1 or not 1 <= self.min_hops <= self.max_hops:
            raise ValueError("n_viewpoints, min_hops, max_hops: need 1 <= min_hops <= max_hops < n_viewpoints")
        if not (self.area_m > 0 and 0 < self.min_spacing_m < self.edge_radius_m and self.visibility_m > 0):
            raise ValueError("area_m, visibility_m must be > 0 and 0 < min_spacing_m < edge_radius_m")
        if self.feature_dim < 1 or self.noise < 0:
            raise ValueError("feature_dim must be >= 1 and noise >= 0")


@dataclass
class Scan:
    scan_id: str
    graph: NavGraph
    landmarks: np.ndarray           # int per viewpoint: index into LANDMARKS


@dataclass
class Episode:
    episode_id: str
    scan_id: str
    path: list[int]                 # the shortest path, start to goal
    heading: float                  # initial heading, radians clockwise from north (+y)
    instruction: str
    distance: float                 # d(start, goal) along the graph, metres


def bearing(graph: NavGraph, a: int, b: int) -> float:
    """Heading from a to b: radians clockwise from +y, in [0, 2 pi)."""
    dx, dy = graph.positions[b, :2] - graph.positions[a, :2]
    return math.atan2(dx, dy) % (2 * math.pi)


def angle_diff(a: float, b: float) -> float:
    """a - b wrapped into (-pi, pi]."""
    d = (a - b) % (2 * math.pi)
    return d - 2 * math.pi if d > math.pi else d


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def generate_scan(seed: int, index: int, cfg: R2RConfig = R2RConfig(), max_tries: int = 50) -> Scan:
    """Scan `index` of the family `seed`; redraws (deterministically) until the graph is connected."""
    cfg.validate()
    for attempt in range(max_tries):
        rng = _rng(seed, index, attempt)
        points: list[np.ndarray] = []
        while len(points) < cfg.n_viewpoints:
            p = rng.uniform(0, cfg.area_m, size=2)
            if all(np.linalg.norm(p - q) >= cfg.min_spacing_m for q in points):
                points.append(p)
        pos = np.column_stack([np.array(points), np.full(len(points), CAMERA_HEIGHT_M)])
        probe = NavGraph(pos, [])
        pairs = sorted((float(np.linalg.norm(pos[i] - pos[j])), i, j) for i in range(len(pos))
                       for j in range(i + 1, len(pos)) if np.linalg.norm(pos[i] - pos[j]) <= cfg.edge_radius_m)
        edges: list[tuple[int, int]] = []
        taken: list[list[float]] = [[] for _ in pos]       # bearings of each viewpoint's neighbours
        for _, i, j in pairs:                              # shortest first
            bij, bji = bearing(probe, i, j), bearing(probe, j, i)
            if all(abs(angle_diff(bij, b)) >= MIN_NEIGHBOUR_ANGLE for b in taken[i]) and \
                    all(abs(angle_diff(bji, b)) >= MIN_NEIGHBOUR_ANGLE for b in taken[j]):
                edges.append((i, j))
                taken[i].append(bij)
                taken[j].append(bji)
        graph = NavGraph(pos, edges)
        if np.isfinite(graph.dijkstra(0)).all():
            return Scan(f"synth-{seed}-{index}", graph, rng.integers(0, len(LANDMARKS), len(pos)))
    raise RuntimeError(f"no connected scan in {max_tries} draws: make edge_radius_m larger or area_m smaller")


def landmark_embeddings(feature_dim: int) -> np.ndarray:
    """Fixed unit vectors, one per landmark: the 'visual appearance' of each kind of object."""
    e = _rng(7, feature_dim).standard_normal((len(LANDMARKS), feature_dim))
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def panorama(scan: Scan, vp: int, heading: float, cfg: R2RConfig, rng: np.random.Generator | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(features 36 x feature_dim, angles 36 x 4) seen from vp facing `heading`."""
    emb = landmark_embeddings(cfg.feature_dim)
    g = scan.graph
    rel = np.arange(N_HEADINGS) * (2 * math.pi / N_HEADINGS)
    level = np.zeros((N_HEADINGS, cfg.feature_dim))
    for q in range(len(g)):
        r = float(np.linalg.norm(g.positions[q] - g.positions[vp]))
        if q == vp or r > cfg.visibility_m:
            continue
        align = np.cos(np.array([angle_diff(bearing(g, vp, q), heading + h) for h in rel]))
        level += np.outer(np.clip(align, 0, None) ** 8 * math.exp(-r / 4.0), emb[scan.landmarks[q]])
    rows = [np.tile(emb[scan.landmarks[vp]], (N_HEADINGS, 1)), level, 0.5 * level]
    feats = np.concatenate(rows)
    if rng is not None and cfg.noise:
        feats = feats + rng.normal(0, cfg.noise, feats.shape)
    elev = np.repeat(ELEVATIONS, N_HEADINGS)
    heads = np.tile(rel, len(ELEVATIONS))
    angles = np.column_stack([np.sin(heads), np.cos(heads), np.sin(elev), np.cos(elev)])
    return feats.astype(np.float32), angles.astype(np.float32)


def move(scan: Scan, vp: int, heading: float, action: int) -> tuple[int, float]:
    """(new viewpoint, new heading) after `action`; a view with no neighbour within 30 deg of its
    heading leaves the agent where it is, turned that way."""
    if not 0 <= action < N_VIEWS:
        raise ValueError(f"action {action}: a view index 0..{N_VIEWS - 1} (stop is handled by the caller)")
    want = (heading + (action % N_HEADINGS) * 2 * math.pi / N_HEADINGS) % (2 * math.pi)
    best = min(scan.graph.neighbours[vp], key=lambda q: abs(angle_diff(bearing(scan.graph, vp, q), want)),
               default=None)
    if best is None or abs(angle_diff(bearing(scan.graph, vp, best), want)) > MIN_NEIGHBOUR_ANGLE:
        return vp, want
    return best, bearing(scan.graph, vp, best)


def teacher_action(scan: Scan, vp: int, heading: float, goal: int) -> int:
    """The level-row view toward the next hop of a shortest path to the goal, or STOP there."""
    if vp == goal:
        return STOP
    nxt = scan.graph.shortest_path(vp, goal)[1]
    i = round(((bearing(scan.graph, vp, nxt) - heading) % (2 * math.pi)) / (2 * math.pi / N_HEADINGS)) % N_HEADINGS
    return LEVEL_ROW * N_HEADINGS + i


def _turn(delta: float) -> str:
    if abs(delta) > math.radians(135):
        return "turn around"
    if delta < -math.radians(45):
        return "turn left"
    if delta > math.radians(45):
        return "turn right"
    return "go straight"


def instruction(scan: Scan, path: Sequence[int], heading: float, rng: np.random.Generator) -> str:
    """"walk forward, turn left at the sofa, go past the lamp and stop next to the piano ." """
    g, names = scan.graph, [LANDMARKS[i] for i in scan.landmarks]
    first = _turn(angle_diff(bearing(g, path[0], path[1]), heading))
    clauses = [f"{['walk', 'go', 'head'][rng.integers(3)]} forward" if first == "go straight" else first]
    for k in range(1, len(path) - 1):
        turn = _turn(angle_diff(bearing(g, path[k], path[k + 1]), bearing(g, path[k - 1], path[k])))
        clauses.append(f"go past the {names[path[k]]}" if turn == "go straight" else f"{turn} at the {names[path[k]]}")
    stop = ["stop next to", "wait by", "stop at"][rng.integers(3)]
    return ", ".join(clauses) + f" and {stop} the {names[path[-1]]} ."


def generate_episodes(seed: int, n_scans: int, episodes_per_scan: int, cfg: R2RConfig = R2RConfig()
                      ) -> tuple[dict[str, Scan], list[Episode]]:
    """Scans 0..n_scans-1 of family `seed` and episodes_per_scan episodes on each."""
    scans, episodes = {}, []
    for s in range(n_scans):
        scan = generate_scan(seed, s, cfg)
        scans[scan.scan_id] = scan
        rng = _rng(seed, s, 10**6)
        for e in range(episodes_per_scan):
            for _ in range(1000):
                start, goal = (int(v) for v in rng.choice(len(scan.graph), 2, replace=False))
                path = scan.graph.shortest_path(start, goal)
                if cfg.min_hops <= len(path) - 1 <= cfg.max_hops:
                    break
            else:
                raise RuntimeError(f"{scan.scan_id}: no path of {cfg.min_hops}..{cfg.max_hops} hops")
            heading = float(rng.uniform(0, 2 * math.pi))
            episodes.append(Episode(f"{scan.scan_id}-{e}", scan.scan_id, path, heading,
                                    instruction(scan, path, heading, rng), scan.graph.distance(start, goal)))
    return scans, episodes


# policy(features B x 36 x F, angles B x 36 x 4, instructions) -> actions B (0..36)
R2RPolicy = Callable[[np.ndarray, np.ndarray, list[str]], np.ndarray]


def teacher_samples(scans: dict[str, Scan], episodes: Sequence[Episode], cfg: R2RConfig, seed: int = 0) -> dict:
    """Behaviour-cloning data along the expert paths: one sample per step and one to stop."""
    rng = _rng(seed, 2)
    feats, angles, actions, texts = [], [], [], []
    for ep in episodes:
        scan, vp, heading = scans[ep.scan_id], ep.path[0], ep.heading
        while True:
            f, a = panorama(scan, vp, heading, cfg, rng)
            action = teacher_action(scan, vp, heading, ep.path[-1])
            feats.append(f)
            angles.append(a)
            actions.append(action)
            texts.append(ep.instruction)
            if action == STOP:
                break
            vp, heading = move(scan, vp, heading, action)
    return {"features": np.stack(feats), "angles": np.stack(angles), "actions": np.asarray(actions, dtype=np.int64),
            "instructions": texts}


def rollout(policy: R2RPolicy, scans: dict[str, Scan], episodes: Sequence[Episode], cfg: R2RConfig,
            max_steps: int = 15, seed: int = 0) -> list[tuple[list[int], EpisodeMetrics]]:
    """Run every episode in lockstep until the policy stops or max_steps moves; trajectory + metrics."""
    rng = _rng(seed, 3)
    state = [(ep.path[0], ep.heading) for ep in episodes]
    trajectories = [[ep.path[0]] for ep in episodes]
    active = list(range(len(episodes)))
    for _ in range(max_steps):
        if not active:
            break
        views = [panorama(scans[episodes[i].scan_id], *state[i], cfg, rng) for i in active]
        actions = policy(np.stack([v[0] for v in views]), np.stack([v[1] for v in views]),
                         [episodes[i].instruction for i in active])
        still = []
        for i, a in zip(active, np.asarray(actions).tolist()):
            if a == STOP:
                continue
            state[i] = move(scans[episodes[i].scan_id], *state[i], int(a))
            trajectories[i].append(state[i][0])
            still.append(i)
        active = still
    return [(t, episode_metrics(scans[ep.scan_id].graph, t, ep.path[-1])) for t, ep in zip(trajectories, episodes)]
