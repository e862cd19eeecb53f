"""Simulation mode: virtual participants in one process through the product's own code.

The slow case is the must-show: a simulation of three sites ends with exactly the shared factors
of a real run of three participant processes with the same seeds (no DP: its noise comes from OS
entropy by design, so no two runs agree).
"""
from __future__ import annotations

import argparse
import json
import re
import sqlite3

import numpy as np
import pytest
from safetensors.numpy import load_file

from kt_core.config import ConfigError, load_toml
from ktfed import simulate_cmd
from ktfed.simulate import InProcessRpcError, simulate, simulation_config
from tests.conftest import SITES, fast_config


def _cli(argv) -> int:
    """`ktfed simulate …` through the CLI when it has the command, else through its own parser."""
    from ktfed import cli

    if "simulate" in cli.build_parser()._subparsers._group_actions[0].choices:
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="ktfed")
    simulate_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_simulate_command_runs_every_virtual_site_through_every_round(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(fast_config(rounds=5, min_sites=2, epochs=1))
    out = tmp_path / "sim"
    assert _cli(["simulate", "--participants", "4", "--config", str(config), "--rounds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 rounds x 4 virtual participants" in printed
    summary = json.loads((out / "simulation.json").read_text())
    assert summary["state"] == "finished" and summary["rounds"] == 2 and summary["participants"] == 4
    assert [r["contributors"] for r in summary["per_round"]] == [4, 4]
    assert summary["participant_rounds_per_s"] > 0
    assert set(summary["exit_codes"].values()) == {0}
    # four names of the simulation's own (the config lists three sites), each upload counted once
    db = sqlite3.connect(out / "coordinator" / "coordinator.sqlite3")
    rows = db.execute("SELECT round, site_id FROM uploads ORDER BY round, site_id").fetchall()
    assert rows == [(r, f"site-{i:03d}") for r in (1, 2) for i in range(4)]
    assert db.execute("SELECT COUNT(*) FROM refusals").fetchone()[0] == 0
    state = load_file(str(out / summary["state_file"]))
    assert state and all(np.isfinite(a).all() for a in state.values())
    for i in range(4):   # each virtual site kept its private factors on its own "disk"
        assert list((out / "sites" / f"site-{i:03d}").glob("private-*.safetensors"))
    # a folder that is not a simulation's is not overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious").write_text("x")
    assert _cli(["simulate", "--participants", "2", "--config", str(config), "--out", str(tmp_path / "other")]) == 2
    assert "was not made by `ktfed simulate`" in capsys.readouterr().err


def test_simulation_config_checks_its_input():
    config = load_toml(fast_config())
    assert simulation_config(config, 3).federation.sites == tuple(SITES)
    assert simulation_config(config, 5, rounds=7).federation.rounds == 7
    with pytest.raises(ConfigError, match="exceeds federation.max_sites"):
        simulation_config(load_toml(fast_config().replace("[federation]\n", "[federation]\nmax_sites = 4\n")), 5)
    with pytest.raises(ConfigError, match="--participants: must be >= 1"):
        simulation_config(config, 0)


def test_in_process_refusals_look_like_grpc_ones(tmp_path):
    from coordinator.coordinator import Coordinator
    from coordinator.service import ParticipantServicer, generic_handler
    from coordinator.store import Store
    from kt_core.wire import convert
    from kt_core.wire import federation_pb2 as pb
    from ktfed.simulate import IdentityAuth, InProcessStub

    store = Store(tmp_path)
    coordinator = Coordinator(store)
    coordinator.start_run(load_toml(fast_config()))
    try:
        handler = generic_handler("ParticipantService", ParticipantServicer(coordinator, IdentityAuth()),
                                  store.record_refusal)
        stub = InProcessStub(handler, "site-a")
        assert stub.Join(pb.JoinRequest(header=convert.header(site_id="site-a"))).manifest
        with pytest.raises(InProcessRpcError) as info:   # another site's id: refused as over mTLS
            stub.Join(pb.JoinRequest(header=convert.header(site_id="site-b")))
        assert info.value.code().name == "PERMISSION_DENIED" and "differs from the caller" in info.value.details()
        outsider = InProcessStub(handler, "site-z")
        with pytest.raises(InProcessRpcError, match="site-z is not a site of run"):
            outsider.Join(pb.JoinRequest(header=convert.header(site_id="site-z")))
        assert [r[0] for r in store.db.execute("SELECT peer FROM refusals")] == ["in-process:site-a",
                                                                                   "in-process:site-z"]
    finally:
        coordinator.stop("shutdown")
        store.close()


@pytest.mark.slow
def test_simulation_equals_the_real_three_process_run(federation, tmp_path):
    text = fast_config(rounds=3, min_sites=3)
    federation.start_coordinator(federation.write_config(text))
    federation.wait_serving()
    for site in SITES:
        federation.start_participant(site)
    real_status = federation.wait_rounds(3, timeout=240)
    assert real_status.state == "finished"
    real_dir = next((federation.workdir / "coordinator" / "runs").iterdir())
    real = load_file(str(real_dir / "round-00003.safetensors"))

    sim = simulate(load_toml(text), 3, tmp_path / "sim", timeout_s=600)
    assert sim.status.state == "finished" and sim.rounds == 3
    assert set(sim.final_state) == set(real)
    for name in real:
        np.testing.assert_allclose(sim.final_state[name], real[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # the same training, round by round: contributors and each site's accuracies agree
    for ours, theirs in zip(sim.status.rounds, real_status.rounds):
        assert list(ours.contributors) == list(theirs.contributors) == SITES
        for site in SITES:
            for key in ("accuracy_before", "accuracy", "loss"):
                assert ours.metrics[f"{site}/{key}"] == pytest.approx(theirs.metrics[f"{site}/{key}"], abs=1e-6)
    # and so do the private factors each site kept
    for site in SITES:
        (real_private,) = (federation.workdir / "sites" / site).glob("private-*.safetensors")
        (sim_private,) = (tmp_path / "sim" / "sites" / site).glob("private-*.safetensors")
        theirs, ours = load_file(str(real_private)), load_file(str(sim_private))
        for name in theirs:
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7, err_msg=f"{site} {name}")


@pytest.mark.slow
def test_simulation_runs_secure_aggregation_and_dp_sgd(tmp_path):
    extra = """
[secagg]
enabled = true
clip_norm = 100.0

[privacy]
enabled = true
mechanism = "dp_sgd"
noise_multiplier = 1.0
epsilon_budget = 50.0
delta = 1e-4
"""
    sim = simulate(load_toml(fast_config(rounds=2, min_sites=3, epochs=1, extra=extra)), 3,
                   tmp_path / "sim", timeout_s=600)
    assert sim.status.state == "finished"
    assert all(r.secagg and len(r.contributors) == 3 for r in sim.status.rounds)
    for p in sim.status.sites:
        assert p.privacy_status == "ok" and 0 < p.epsilon_spent < 50
    for site in SITES:
        assert (tmp_path / "sim" / "sites" / site / "privacy-ledger.sqlite3").exists()


def test_a_simulation_whose_partition_leaves_sites_out_fails_at_once_naming_the_setting(tmp_path):
    # 60 digits over 8 sites by quantity skew: most sites get no training sample. Each such site
    # refuses the run (run unworkable, naming data.partition), and the run fails once too few are left
    text = fast_config(rounds=2, min_sites=2, epochs=1).replace(
        '[data]\ndataset = "digits"\n', '[data]\ndataset = "digits"\nmax_train = 60\nmax_test = 40\n').replace(
        'scheme = "dirichlet"\nalpha = 1.0\nseed = 3', 'scheme = "quantity"\nalpha = 0.1\nseed = 9')
    with pytest.raises(RuntimeError) as err:
        simulate(load_toml(text), 8, tmp_path / "sim", timeout_s=120)
    message = str(err.value)
    assert "failed: too few sites take part: " in message and "federation.min_sites = 2" in message
    assert ("(run_refused: run unworkable: site-00") in message
    assert "data.partition (scheme 'quantity', seed 9) gives this site no training samples of 60 over 8 sites" in message
    db = sqlite3.connect(tmp_path / "sim" / "coordinator" / "coordinator.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM aborted_attempts").fetchone()[0] == 1


def test_a_simulation_that_every_site_policy_refuses_fails_after_one_attempt(tmp_path):
    # the virtual sites hold the default site policy, which does not take dense adapters (they
    # send the whole weight update): each refuses the run, and the coordinator does not ask again
    with pytest.raises(RuntimeError) as err:
        simulate(load_toml(fast_config(rounds=2, min_sites=2, epochs=1, adapter="dense")), 3, tmp_path / "sim",
                 timeout_s=120)
    message = str(err.value)
    assert re.search(r"failed: too few sites take part: site-. \(run_refused: site policy model\.adapters", message)
    db = sqlite3.connect(tmp_path / "sim" / "coordinator" / "coordinator.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM aborted_attempts").fetchone()[0] == 1
    assert {c for (c,) in db.execute("SELECT code FROM declines")} == {"run_refused"}
