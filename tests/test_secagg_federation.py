"""Secure aggregation with real processes: the coordinator learns only the sum, survives
dropouts at any step, aborts cleanly below the threshold, and keeps no individual update."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.secagg_round import check_config
from coordinator.coordinator import initial_state, shared_specs
from kt_core import vector
from kt_core.config import ConfigError, load_toml
from ktfed.launcher import make_pki
from security import secagg
from security.audit import verify
from tests.conftest import LocalFederation, fast_config

FIVE = ["site-a", "site-b", "site-c", "site-d", "site-e"]


def secagg_section(**fields) -> str:
    body = {"enabled": "true", **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}}
    return "\n[secagg]\n" + "\n".join(f"{k} = {v}" for k, v in body.items()) + "\n"


@pytest.fixture(scope="module")
def pki_five(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pki5")
    make_pki(path, FIVE)
    return path


@pytest.fixture
def fed5(tmp_path, pki_five):
    fed = LocalFederation(tmp_path, pki_five)
    yield fed
    fed.close()


def _state(fed: LocalFederation, round_no: int) -> dict[str, np.ndarray]:
    (run_id,) = fed.db().execute("SELECT run_id FROM runs").fetchone()
    return load_file(str(fed.workdir / "coordinator" / "runs" / run_id / f"round-{round_no:05d}.safetensors"))


def _windows(raw: bytes, width: int = 48, count: int = 6) -> list[bytes]:
    """A few distinctive slices of a byte string, to look for in what the coordinator kept."""
    step = max(1, (len(raw) - width) // count)
    return [raw[i:i + width] for i in range(0, len(raw) - width, step)][:count]


def _coordinator_bytes(fed: LocalFederation) -> bytes:
    blobs = []
    for path in sorted((fed.workdir / "coordinator").rglob("*")):
        if path.is_file():
            blobs.append(path.read_bytes())
    for path in sorted((fed.workdir / "logs").glob("coordinator*")):
        blobs.append(path.read_bytes())
    return b"\n".join(blobs)


@pytest.mark.slow
def test_five_sites_two_dropouts_exact_sum_and_nothing_individual_kept(fed5):
    """One site dies after sharing its keys, one after sending its masked input: the round still
    completes with exactly the sum of the four inputs that were masked, the next round goes on
    with the three left, and the coordinator's files and logs hold no individual update."""
    text = fast_config(rounds=2, min_sites=3, sites=FIVE, epochs=1) + secagg_section(step_timeout_s=20)
    config = load_toml(text).resolved()
    fed5.start_coordinator(fed5.write_config(text))
    fed5.wait_serving()
    exports = fed5.workdir / "exports"
    for site in FIVE:
        env = {"KTFED_TEST_EXPORT_SECAGG_INPUT": str(exports)}
        if site == "site-d":
            env["KTFED_FAULT_EXIT_AFTER_SECAGG_STEP"] = "share_keys"
        if site == "site-e":
            env["KTFED_FAULT_EXIT_AFTER_SECAGG_STEP"] = "masked_input"
        fed5.start_participant(site, env=env)
    status = fed5.wait_for(lambda: (s := fed5.status()).state == "finished" and s, 240, "the run to finish")

    first, second = status.rounds[0], status.rounds[1]
    assert first.secagg and second.secagg
    # site-e's masked input is in the sum (its self-mask was recovered); site-d's is not (its
    # pairwise masks were recovered instead)
    assert sorted(first.contributors) == ["site-a", "site-b", "site-c", "site-e"]
    assert "site-d" in first.dropped
    assert sorted(second.contributors) == ["site-a", "site-b", "site-c"]

    # the exact sum: add the survivors' encoded inputs in Z_2^32 and decode as the coordinator must
    total = np.zeros_like(np.load(exports / "site-a-round1-encoded.npy"))
    for site in first.contributors:
        np.add(total, np.load(exports / f"{site}-round1-encoded.npy"), out=total)
    weighted, weight = secagg.decode_sum(total, config.secagg.bits)
    specs = shared_specs(initial_state(config)[0])
    step = vector.unflatten(weighted * config.max_weight() / weight, specs)
    before, after = _state(fed5, 0), _state(fed5, 1)
    for name in specs:
        np.testing.assert_allclose(after[name], (before[name] + step[name]).astype(before[name].dtype),
                                   rtol=0, atol=1e-6)

    summary = json.loads(fed5.db().execute("SELECT summary_json FROM secagg_rounds WHERE round = 1").fetchone()[0])
    assert summary["reconstructed_mask_key_of"] == ["site-d"]
    assert "site-e" in summary["reconstructed_self_mask_of"]
    assert not set(summary["reconstructed_mask_key_of"]) & set(summary["reconstructed_self_mask_of"])

    # nothing of any individual update (plain float32/float64, or encoded before masking) is kept
    kept = _coordinator_bytes(fed5)
    for path in sorted(exports.glob("*-update.npy")):
        flat = np.load(path)
        for raw in (flat.astype(np.float32).tobytes(), flat.tobytes()):
            assert not any(w in kept for w in _windows(raw)), f"{path.name} found at the coordinator"
    for path in sorted(exports.glob("*-encoded.npy")):
        assert not any(w in kept for w in _windows(np.load(path).tobytes())), f"{path.name} found"
    log = fed5.log()
    assert "unmasked the sum of 4 input(s)" in log

    # the audit logs of the coordinator and all five sites (two of them killed mid-protocol) verify:
    # what the dead sites never answered is logged as of unknown delivery, not as a missing receipt;
    # the lenient reading, since a killed site never closes its log nor countersigns the run's seal
    dirs = [fed5.workdir / "coordinator" / "audit"] + [fed5.workdir / "sites" / s / "audit" for s in FIVE]
    result = verify(dirs, (fed5.pki / "ca.crt").read_bytes(), partial=True)
    assert result.ok, str(result)
    coordinator_log = next(v for v in result.logs if v.producer == "coordinator")
    secagg_events = [e.body for e in coordinator_log.entries if e.kind == "secagg"]
    assert any(b["round"] == 1 and b["reconstructed"] for b in secagg_events)


@pytest.mark.slow
def test_fewer_than_t_survivors_abort_cleanly_then_the_next_attempt_completes(federation):
    text = fast_config(rounds=1, min_sites=2, epochs=1) + secagg_section(step_timeout_s=15)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    dying = {"KTFED_FAULT_EXIT_AFTER_SECAGG_STEP": "share_keys"}
    federation.start_participant("site-a")
    federation.start_participant("site-b", env=dying)
    federation.start_participant("site-c", env=dying)
    # two of three die after sharing keys: one masked input is fewer than t = 2, so no unmasking
    federation.wait_for(lambda: federation.db().execute("SELECT reason FROM aborted_attempts").fetchone(), 180,
                        "the round to abort")
    (reason,) = federation.db().execute("SELECT reason FROM aborted_attempts").fetchone()
    assert "fewer than threshold" in reason, reason
    assert federation.status().rounds_completed == 0
    federation.start_participant("site-b")
    federation.start_participant("site-c")
    status = federation.wait_for(lambda: (s := federation.status()).state == "finished" and s, 180,
                                 "the retried round to complete")
    assert status.rounds[0].secagg
    assert sorted(status.rounds[0].contributors) == ["site-a", "site-b", "site-c"]
    assert status.aborted_attempts >= 1


# -- configuration refusals (no network) -----------------------------------------------------

def _check(text: str) -> None:
    config = load_toml(text).resolved()
    check_config(config, shared_specs(initial_state(config)[0]))


def test_config_refuses_too_small_threshold():
    with pytest.raises(ConfigError, match="too small"):
        _check(fast_config(sites=FIVE) + secagg_section(threshold=2))


def test_config_refuses_overflow_prone_encoding():
    with pytest.raises(ConfigError, match="overflow"):
        _check(fast_config() + secagg_section(clip_norm=1e6, bits=20))


def test_config_refuses_distributed_noise_without_secagg():
    with pytest.raises(ConfigError, match="privacy.mechanism"):
        _check(fast_config() + "\n[privacy]\nenabled = true\nmechanism = \"distributed\"\n")


def test_config_refuses_min_sites_below_threshold():
    with pytest.raises(ConfigError, match="min_sites"):
        _check(fast_config(sites=FIVE, min_sites=2) + secagg_section(threshold=4))


def test_config_accepts_defaults():
    _check(fast_config() + secagg_section())


@pytest.mark.slow
def test_active_option_signed_advertisements_with_certificates_relayed_by_the_coordinator(federation):
    """Each site signs its key advertisement and acknowledgement with its certificate key and
    checks the others' against the federation CA; the round completes."""
    text = fast_config(rounds=1, min_sites=3, epochs=1) + secagg_section(active=True)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    for site in ("site-a", "site-b", "site-c"):
        federation.start_participant(site)
    status = federation.wait_for(lambda: (s := federation.status()).state == "finished" and s, 180,
                                 "the run to finish")
    assert status.rounds[0].secagg
    assert sorted(status.rounds[0].contributors) == ["site-a", "site-b", "site-c"]
    summary = json.loads(federation.db().execute("SELECT summary_json FROM secagg_rounds").fetchone()[0])
    assert summary["active"] is True
