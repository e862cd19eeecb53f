"""A real federation: coordinator and three participants as processes, mTLS gRPC on loopback."""
from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file

from kt_core.config import load_toml
from kt_core.manifest import FactorManifest, Role
from tests.conftest import SITES, fast_config


def test_three_sites_three_rounds_learn_and_only_shared_factors_cross(federation):
    config = federation.write_config(fast_config(rounds=3, min_sites=3))
    federation.start_coordinator(config)
    federation.wait_serving()
    for site in SITES:
        federation.start_participant(site)
    status = federation.wait_rounds(3, timeout=180)
    assert status.state == "finished"
    assert [r.round for r in status.rounds] == [1, 2, 3]

    # Learning: every site's local test accuracy after the last round beats round 0's.
    first, last = status.rounds[0].metrics, status.rounds[-1].metrics
    for site in SITES:
        assert last[f"{site}/accuracy"] > first[f"{site}/accuracy_before"] + 0.1, (site, dict(last))

    # What crossed the wire: the coordinator recorded every received upload from the messages
    # themselves; each names exactly the manifest's shared tensors, with their shapes.
    db = federation.db()
    (manifest_json,) = db.execute("SELECT manifest_json FROM runs").fetchone()
    manifest = FactorManifest.from_json(manifest_json)
    shared = {e.name: list(e.shape) for e in manifest.shared()}
    assert manifest.private(), "a WAFFLe model must have private tensors to keep home"
    uploads = db.execute("SELECT round, site_id, tensors_json, bytes FROM uploads").fetchall()
    assert len(uploads) == 9
    for round_no, site_id, tensors_json, nbytes in uploads:
        tensors = json.loads(tensors_json)
        assert {t["name"]: t["shape"] for t in tensors} == shared, (round_no, site_id)
        assert nbytes == sum(t["nbytes"] for t in tensors) == manifest.shared_nbytes()

    # What the coordinator stores: only shared tensors, in files that match their digests.
    run_dir = next((federation.workdir / "coordinator" / "runs").iterdir())
    files = sorted(run_dir.glob("round-*.safetensors"))
    assert [f.name for f in files] == [f"round-{i:05d}.safetensors" for i in range(4)]
    for path in files:
        state = load_file(str(path))
        assert set(state) == set(shared)
        assert all(manifest.role_of(n) == Role.SHARED for n in state)
        assert all(np.isfinite(a).all() for a in state.values())

    # The private factors exist at the sites, on the sites' disks only.
    for site in SITES:
        private = list((federation.workdir / "sites" / site).glob("private-*.safetensors"))
        assert len(private) == 1
        assert set(load_file(str(private[0]))) == {e.name for e in manifest.private()}

    # Every participant exits by itself once the run is finished, and says so in its heartbeat
    # file (what the Kubernetes probes read).
    for site, proc in federation.participants.items():
        assert proc.wait(30) == 0
        beat = json.loads((federation.workdir / "sites" / site / "heartbeat.json").read_text())
        assert beat["site"] == site and beat["status"] == "finished" and beat["round"] == 3


def test_egress_guard_refuses_private_tensors_and_says_so(federation):
    config = federation.write_config(fast_config(rounds=3, min_sites=1, timeout=5,
                                                 sites=["site-a", "site-b"]))
    federation.start_coordinator(config)
    federation.wait_serving()
    federation.start_participant("site-a", env={"KTFED_FAULT_LEAK_PRIVATE": "1"})
    federation.start_participant("site-b")
    federation.wait_for(lambda: "update not sent (egress guard)" in federation.log("site-a"), 120,
                        "site-a's egress guard to refuse")
    status = federation.wait_rounds(3, timeout=120)
    log = federation.log("site-a")
    assert "egress refused" in log and "gate_logits (private)" in log
    assert all(list(r.contributors) == ["site-b"] for r in status.rounds)
    assert any("site-a" in r.dropped for r in status.rounds)
    (manifest_json,) = federation.db().execute("SELECT manifest_json FROM runs").fetchone()
    assert status.manifest_digest == FactorManifest.from_json(manifest_json).digest()
    (count,) = federation.db().execute("SELECT COUNT(*) FROM uploads WHERE site_id = 'site-a'").fetchone()
    assert count == 0


def test_fast_config_is_valid():
    config = load_toml(fast_config()).resolved()
    assert config.data.dataset == "digits" and config.model.input_dim == 64
