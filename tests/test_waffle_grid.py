"""The WAFFLe grid's scheduling and output files (bench/waffle_grid.py)."""
import json

import pytest

from bench import waffle_grid as grid
from kt_core.data import fashion_mnist_available


def test_the_grid_runs_one_job_per_seed_longest_first():
    jobs = grid._jobs(["digits"], ["shards2", "dir0.1"], [5, 50], [10, 11], ["sgd", "adam"], rounds=3)
    assert len(jobs) == 2 * 2 * 2 * 2
    assert sorted(jobs) == sorted({(ds, p, n, s, o, r) for ds, p, n, s, o, r in jobs})   # no job twice
    costs = [grid._cost(j) for j in jobs]
    assert costs == sorted(costs, reverse=True)
    assert jobs[0][2] == 50 and jobs[0][4] == "adam" and jobs[-1][2] == 5 and jobs[-1][4] == "sgd"
    both = grid._jobs(["digits", "fashion-mnist"], ["shards2"], [50], [10], ["sgd"], rounds=3)
    if fashion_mnist_available():   # the larger inputs first: a Fashion-MNIST job costs more
        assert [j[0] for j in both] == ["fashion-mnist", "digits"]
    else:
        assert [j[0] for j in both] == ["digits"]


def test_a_grid_over_two_data_sets_writes_one_file_per_data_set(tmp_path):
    datasets = ["digits", "fashion-mnist"]
    result = grid.run_grid(datasets, ["shards2"], [5], [10, 11], ["sgd"], rounds=1, out=tmp_path, name="g",
                           jobs=1, command="python -m bench.waffle_grid (test)")
    present = ["digits", "fashion-mnist"] if fashion_mnist_available() else ["digits"]
    assert [c["dataset"] for c in result["cells"]] == present
    cell = result["cells"][0]
    assert [s["sites_used"] for s in cell["seeds"]] == [5, 5]     # both seeds, in seed order
    assert cell["wall_s"] == pytest.approx(sum(s["wall_s"] for s in cell["seeds"]))
    assert not (tmp_path / "g.partial.json").exists()
    if len(present) == 1:          # one data set: the caller writes <name>.json, the plot is <name>.png
        assert (tmp_path / "g.png").exists()
        return
    for ds, short in (("digits", "digits"), ("fashion-mnist", "fashion")):
        own = json.loads((tmp_path / f"g_{short}.json").read_text())
        assert [c["dataset"] for c in own["cells"]] == [ds]
        assert own["command"] == "python -m bench.waffle_grid (test)" and own["settings"]["rounds"] == 1
        assert (tmp_path / f"g_{short}.png").exists()
