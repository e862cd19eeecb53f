"""The secagg and dp benchmarks run end to end at their --quick size and write complete results.

Only the shape of the results is checked (keys present, numbers positive); times are never asserted.
"""
import json
import math

import pytest

from bench.common import Options, write_json


def _run(name: str, tmp_path) -> dict:
    """Run bench/<name>.py in quick mode as `python -m bench` would, and read back its JSON."""
    import importlib

    module = importlib.import_module(f"bench.{name}")
    data = module.run(Options(quick=True, out=tmp_path))
    path = write_json(tmp_path, name, {"benchmark": name, "quick": True, **data})
    return json.loads(path.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_secagg_bench_quick(tmp_path):
    from bench import secagg

    data = _run("secagg", tmp_path)
    assert (tmp_path / "secagg.png").stat().st_size > 0
    assert set(data["targets"]) >= {"n", "m", "client_s", "server_extra_s", "mask_expansion_ratio_to_raw"}

    cases = data["cases"]
    assert {c["n"] for c in cases} == {3, 10}
    assert {c["graph"].split()[0] for c in cases} == {"complete", "secagg+"}
    for c in cases:
        assert c["exact"] is True, c
        for key in ("client_s", "server_s", "bytes_up", "bytes_down", "up_ratio", "down_ratio"):
            assert _positive(c[key]), (key, c)
        assert set(c["client_steps_s"]) == set(secagg.CLIENT_STEPS)
        assert set(c["server_steps_s"]) == set(secagg.SERVER_STEPS)
        # the masked vector alone is m + 1 words: SecAgg never uploads less than the plain update
        assert c["bytes_up"] > c["plain_upload_bytes"]
        assert c["survivors"] == c["n"] - len(c["dropped"])

    target = [c for c in cases if (c["n"], c["m"], c["k"]) == (secagg.TARGET_N, secagg.TARGET_M, 0)]
    assert sorted(bool(c["dropped"]) for c in target) == [False, True]
    assert all(c["repeats"] == 3 and len(c["runs"]) == 3 for c in target)

    masks = {v["m"]: v for v in data["mask_expansion"]}
    assert secagg.TARGET_M in masks
    for v in masks.values():
        assert set(v["variants"]) >= {"raw_aes_ctr", "library_expand_mask", "library_add_mask"}
        for r in v["variants"].values():
            assert _positive(r["s"]) and _positive(r["gb_per_s"]) and _positive(r["ratio_to_raw"])

    verdicts = data["verdicts"]
    assert len(verdicts) == 5  # client and coordinator, with and without the dropout; mask expansion
    assert all(isinstance(v["met"], bool) and _positive(v["value"]) for v in verdicts)


@pytest.mark.slow
def test_dp_bench_quick_on_cpu(tmp_path, monkeypatch):
    from bench import dp

    monkeypatch.delenv(dp.DEVICE_ENV, raising=False)
    data = _run("dp", tmp_path)
    assert (tmp_path / "dp.png").stat().st_size > 0
    assert data["device"] == "cpu" and data["batches"] == [64]
    assert set(data["models"]) == {"demo", "dense-mlp", "transformer"}
    for label, entry in data["models"].items():
        assert _positive(entry["params"])
        modes = entry["batches"]["64"]["modes"]
        assert set(modes) == set(dp.MODES)
        for mode, m in modes.items():
            assert m["status"] == "ok" or m["status"].startswith(("unsupported: ", "failed: ")), (label, mode, m)
            if m["status"] == "ok":
                assert _positive(m["ms_per_step"]) and _positive(m["samples_per_s"]), (label, mode)
                assert _positive(m["ratio_to_plain"]), (label, mode)
        assert modes["plain"]["status"] == "ok" and modes["hooks"]["status"] == "ok", label

    # WAFFLe's random gates rule out the modes that re-run the forward; the product's own refusal says so
    demo = data["models"]["demo"]["batches"]["64"]["modes"]
    for mode in ("ew", "functorch"):
        assert demo[mode]["status"].startswith("unsupported: ") and "gates" in demo[mode]["status"]
    # every mode applies to the models built from standard layers
    for label in ("dense-mlp", "transformer"):
        assert all(m["status"] == "ok" for m in data["models"][label]["batches"]["64"]["modes"].values()), label

    rnd = data["participant_round"]
    for key in ("plain_ms_per_step", "dp_hooks_ms_per_step", "ratio"):
        assert _positive(rnd[key]), key


@pytest.mark.slow
def test_dp_bench_refuses_cuda_without_a_gpu(monkeypatch):
    import torch

    from bench import dp

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv(dp.DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dp.bench_device()
    monkeypatch.setenv(dp.DEVICE_ENV, "cpu")
    assert dp.bench_device().type == "cpu"
