"""The benchmarks still run end to end (their --quick size); numbers are never asserted here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_runs_and_writes_results(tmp_path):
    # the three wire benchmarks; the others have their own smoke tests or run minutes even when quick
    out = subprocess.run([sys.executable, "-m", "bench", "overhead", "bytes", "waffle", "--quick",
                          "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("overhead", "bytes", "waffle"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["benchmark"] == name
