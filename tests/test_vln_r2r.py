"""Synthetic R2R: the generator is a function of its seed; the metrics are R2R's, on hand-made
graphs and as properties over random graphs and walks."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kt_core.vln.metrics import GraphError, NavGraph, episode_metrics, summarize
from kt_core.vln.r2r import (N_VIEWS, NUM_ACTIONS, STOP, R2RConfig, generate_episodes, generate_scan, move,
                             panorama, rollout, teacher_action, teacher_samples)


def line_graph(spacing=2.0, n=4) -> NavGraph:
    """0 - 1 - 2 - 3 along x, `spacing` metres apart."""
    return NavGraph([[spacing * i, 0, 0] for i in range(n)], [(i, i + 1) for i in range(n - 1)])


# -- hand-made cases --------------------------------------------------------------------------

def test_shortest_path_agent_scores_perfectly():
    g = line_graph()
    m = episode_metrics(g, [0, 1, 2, 3], goal=3)
    assert (m.nav_error, m.success, m.oracle_success, m.spl) == (0.0, 1.0, 1.0, 1.0)
    assert m.trajectory_length == pytest.approx(6.0) and m.shortest == pytest.approx(6.0)


def test_stopping_at_the_start_fails():
    m = episode_metrics(line_graph(), [0], goal=3)
    assert m.success == 0.0 and m.spl == 0.0 and m.oracle_success == 0.0
    assert m.nav_error == pytest.approx(6.0) and m.trajectory_length == 0.0


def test_success_is_strictly_within_three_metres():
    g = line_graph(spacing=3.0)
    assert episode_metrics(g, [0, 1, 2], goal=3).success == 0.0           # NE = 3.0 exactly
    assert episode_metrics(line_graph(spacing=2.9), [0, 1, 2], goal=3).success == 1.0


def test_detour_lowers_spl_and_overshoot_keeps_oracle_success():
    g = line_graph()
    detour = episode_metrics(g, [0, 1, 0, 1, 2, 3], goal=3)                # walked 10 m for 6 m
    assert detour.success == 1.0 and detour.spl == pytest.approx(6 / 10)
    # passed the goal and walked back past 3 m: failure, but the oracle saw it
    far = NavGraph([[2.0 * i, 0, 0] for i in range(6)], [(i, i + 1) for i in range(5)])
    over = episode_metrics(far, [0, 1, 2, 3, 4, 5], goal=2)
    assert over.success == 0.0 and over.oracle_success == 1.0 and over.nav_error == pytest.approx(6.0)


def test_navigation_error_uses_graph_distance_not_euclidean():
    # a U: 0 and 3 are 1 m apart in space but 12 m apart along the edges
    g = NavGraph([[0, 0, 0], [0, 5, 0], [1, 5, 0], [1, 0, 0]], [(0, 1), (1, 2), (2, 3)])
    m = episode_metrics(g, [0], goal=3)
    assert m.nav_error == pytest.approx(11.0) and m.success == 0.0
    assert g.shortest_path(0, 3) == [0, 1, 2, 3]


def test_bad_graphs_and_trajectories_are_refused():
    with pytest.raises(GraphError, match="endpoints"):
        NavGraph([[0, 0, 0]], [(0, 0)])
    with pytest.raises(GraphError, match="not connected"):
        episode_metrics(line_graph(), [0, 2], goal=3)
    with pytest.raises(GraphError, match="not reachable"):
        episode_metrics(NavGraph([[0, 0, 0], [1, 0, 0]], []), [0], goal=1)


# -- properties -------------------------------------------------------------------------------

@st.composite
def graph_and_walk(draw):
    n = draw(st.integers(2, 9))
    pos = draw(st.lists(st.tuples(*[st.floats(-20, 20, allow_nan=False)] * 2), min_size=n, max_size=n))
    pos = [[x, y, 1.5] for x, y in pos]
    edges = [(i, i + 1) for i in range(n - 1)]                        # a spanning chain keeps it connected
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=n))
    edges += [(a, b) for a, b in extra if a != b]
    g = NavGraph(pos, edges)
    walk = [draw(st.integers(0, n - 1))]
    for _ in range(draw(st.integers(0, 12))):
        walk.append(draw(st.sampled_from(sorted(g.neighbours[walk[-1]]))))
    return g, walk, draw(st.integers(0, n - 1))


@settings(max_examples=200, deadline=None)
@given(graph_and_walk())
def test_metric_properties(case):
    g, walk, goal = case
    m = episode_metrics(g, walk, goal)
    assert 0.0 <= m.spl <= m.success <= m.oracle_success <= 1.0
    assert m.nav_error >= 0 and m.trajectory_length >= 0
    assert m.success == float(m.nav_error < 3.0)
    # a successful walk as long as the shortest path scores SPL = 1 (episode_metrics snaps a length
    # equal up to rounding to the shortest one)
    if m.success and m.trajectory_length == m.shortest:
        assert m.spl == 1.0
    # triangle inequality: you cannot end closer to the goal than shortest - walked
    assert m.nav_error >= m.shortest - m.trajectory_length - 1e-9
    s = summarize([m, m])
    assert s["SPL"] == pytest.approx(m.spl) and s["episodes"] == 2


@settings(max_examples=50, deadline=None)
@given(graph_and_walk())
def test_shortest_path_is_a_shortest_walk(case):
    g, _, goal = case
    for start in range(len(g)):
        path = g.shortest_path(start, goal)
        assert path[0] == start and path[-1] == goal
        assert g.path_length(path) == pytest.approx(g.distance(start, goal))
        assert episode_metrics(g, path, goal).spl == 1.0


# -- the generator ----------------------------------------------------------------------------

def test_generator_is_deterministic_by_seed():
    a_scans, a_eps = generate_episodes(3, 2, 5)
    b_scans, b_eps = generate_episodes(3, 2, 5)
    c_scans, c_eps = generate_episodes(4, 2, 5)
    assert [e.__dict__ for e in a_eps] == [e.__dict__ for e in b_eps]
    for k in a_scans:
        assert np.array_equal(a_scans[k].graph.positions, b_scans[k].graph.positions)
        assert a_scans[k].graph.edges() == b_scans[k].graph.edges()
    assert [e.instruction for e in a_eps] != [e.instruction for e in c_eps]


def test_episodes_are_r2r_shaped():
    cfg = R2RConfig()
    scans, eps = generate_episodes(0, 2, 10, cfg)
    for ep in eps:
        g = scans[ep.scan_id].graph
        assert cfg.min_hops <= len(ep.path) - 1 <= cfg.max_hops
        assert ep.path == g.shortest_path(ep.path[0], ep.path[-1])
        assert ep.distance == pytest.approx(g.path_length(ep.path))
        assert ep.instruction.endswith(" .") and "the" in ep.instruction
    scan = next(iter(scans.values()))
    assert np.isfinite(scan.graph.dijkstra(0)).all()                    # connected
    feats, angles = panorama(scan, 0, 0.3, cfg, np.random.default_rng(0))
    assert feats.shape == (N_VIEWS, cfg.feature_dim) and angles.shape == (N_VIEWS, 4)
    assert np.allclose(angles[:, 0] ** 2 + angles[:, 1] ** 2, 1) and np.allclose(angles[:, 2] ** 2 + angles[:, 3] ** 2, 1)
    assert NUM_ACTIONS == 37 and STOP == 36


def test_teacher_rollout_scores_sr_and_spl_one_and_stopping_scores_zero():
    cfg = R2RConfig()
    scans, eps = generate_episodes(1, 2, 8, cfg)
    data = teacher_samples(scans, eps, cfg)
    assert len(data["actions"]) == sum(len(e.path) for e in eps)         # one move per hop, then stop
    # replay the teacher inside rollout(): a policy with the episodes' state in its closure
    state = {i: (e.path[0], e.heading) for i, e in enumerate(eps)}
    by_text = {}
    for i, e in enumerate(eps):
        by_text.setdefault(e.instruction, []).append(i)

    def teacher(features, angles, texts):
        actions = []
        for t in texts:
            i = by_text[t][0] if len(by_text[t]) == 1 else None
            assert i is not None, "instructions must be unique for this replay"
            vp, h = state[i]
            a = teacher_action(scans[eps[i].scan_id], vp, h, eps[i].path[-1])
            if a != STOP:
                state[i] = move(scans[eps[i].scan_id], vp, h, a)
            actions.append(a)
        return np.array(actions)

    results = rollout(teacher, scans, eps, cfg)
    assert all(t == e.path for (t, _), e in zip(results, eps))
    assert all(m.success == 1.0 and m.spl == 1.0 for _, m in results)
    stop = rollout(lambda f, a, t: np.full(len(t), STOP), scans, eps, cfg)
    assert all(m.success == 0.0 and m.trajectory_length == 0.0 for _, m in stop)   # goals are >= 3 hops away


def test_scan_neighbours_are_separated_by_thirty_degrees():
    scan = generate_scan(0, 0)
    from kt_core.vln.r2r import angle_diff, bearing
    for vp, nb in enumerate(scan.graph.neighbours):
        bs = [bearing(scan.graph, vp, q) for q in nb]
        assert all(abs(angle_diff(a, b)) >= math.radians(30) - 1e-9 for i, a in enumerate(bs) for b in bs[i + 1:])
