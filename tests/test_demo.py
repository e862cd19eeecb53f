"""`ktfed demo` (what `make demo` runs), end to end as a user would run it."""
import os
import subprocess
import sys

import pytest

from tests.test_vln_federation import backbone  # noqa: F401 - the module-scoped pretrained checkpoint


@pytest.mark.slow
def test_image_demo_runs_a_federation_and_prints_the_summary(tmp_path):
    workdir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "ktfed", "demo", "--task", "image", "--rounds", "2",
                          "--workdir", str(workdir)], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.split()[:1] == ["2"] for line in lines), out.stdout  # the round-2 row of the table
    assert "finished: 2 rounds" in out.stdout
    assert "dense FedAvg of the same model would send" in out.stdout
    assert (workdir / "accuracy.png").stat().st_size > 0
    assert (workdir / "coordinator" / "coordinator.sqlite3").exists()
    assert "secure aggregation: on in 2 of 2 rounds" in out.stdout
    assert "audit logs (4 producers, hash-chained and signed): verified" in out.stdout


@pytest.mark.slow
def test_vln_demo_hosts_the_backbone_and_reports_navigation(tmp_path, backbone):
    """The default demo, with a small pretrained checkpoint in place of the demo's own (which
    `make demo` builds once and caches)."""
    workdir = tmp_path / "demo"
    env = {**os.environ, "KTFED_DEMO_BACKBONE": str(backbone), "KTFED_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "ktfed", "demo", "--rounds", "2", "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "adaptation of the hosted VLN backbone on BabyAI" in out.stdout
    assert "finished: 2 rounds" in out.stdout
    assert "navigation after the run" in out.stdout and "success rate" in out.stdout
    assert "audit logs (4 producers, hash-chained and signed): verified" in out.stdout


def test_demo_refuses_a_workdir_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    out = subprocess.run([sys.executable, "-m", "ktfed", "demo", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "was not made by `ktfed demo`" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
