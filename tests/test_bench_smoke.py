"""Every benchmark still runs end to end at its --quick size; numbers are never asserted here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import BENCHMARKS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_quick_runs_every_benchmark_and_writes_results(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in BENCHMARKS:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["benchmark"] == name and data["quick"] is True
        assert data["wall_s"] > 0 and data["cpu_s"] > 0
    # the closing table names every benchmark with its wall and CPU seconds
    summary = out.stdout[out.stdout.rindex("=== done in"):]
    assert all(f"\n{name} " in summary for name in BENCHMARKS), summary
