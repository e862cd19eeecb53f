"""The `ktfed` command line, run as a real subprocess: PKI, config checks, refusing bad state."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from tests.conftest import SITES, fast_config


def ktfed(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "ktfed", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_pki_commands(tmp_path):
    pki = tmp_path / "pki"
    assert ktfed("pki", "init", "--dir", pki).returncode == 0
    again = ktfed("pki", "init", "--dir", pki)
    assert again.returncode == 2 and "error:" in again.stderr
    out = ktfed("pki", "issue", "--dir", pki, "--role", "participant", "--name", "site-q")
    assert out.returncode == 0 and "issued participant certificate for site-q" in out.stdout
    assert stat.S_IMODE(os.stat(pki / "issued" / "site-q.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pki / "ca.key").st_mode) == 0o600
    bad = ktfed("pki", "issue", "--dir", pki, "--role", "participant", "--name", "Bad Name")
    assert bad.returncode == 2 and "Bad Name" in bad.stderr
    bad_role = ktfed("pki", "issue", "--dir", pki, "--role", "admin", "--name", "x")
    assert bad_role.returncode == 2 and "invalid choice: 'admin'" in bad_role.stderr
    revoked = ktfed("pki", "revoke", "--dir", pki, "site-q")
    assert revoked.returncode == 0 and "revoked site-q" in revoked.stdout
    unknown = ktfed("pki", "revoke", "--dir", pki, "nobody")
    assert unknown.returncode == 2 and "nobody" in unknown.stderr


def test_config_check_names_the_bad_field(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(fast_config())
    out = ktfed("config", "check", good)
    assert out.returncode == 0 and '"dataset": "digits"' in out.stdout
    cases = {
        "lr = 0.05": ("lr = \"fast\"", "train.lr: expected a number"),
        "rounds = 3": ("rounds = 0", "federation.rounds: must be >= 1"),
        "adapter = \"waffle\"": ("adapter = \"sparse\"", "model.adapter"),
        "[data]": ("[data]\ncolour = 1", "data.colour: unknown field"),
        "scheme = \"dirichlet\"": ("scheme = \"random\"", "data.partition.scheme"),
    }
    for original, (replacement, message) in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(fast_config().replace(original, replacement, 1))
        out = ktfed("config", "check", bad)
        assert out.returncode == 2, (replacement, out.stdout)
        assert message in out.stderr and str(bad) in out.stderr, (message, out.stderr)
    broken = tmp_path / "broken.toml"
    broken.write_text("[federation\nrounds = 3")
    out = ktfed("config", "check", broken)
    assert out.returncode == 2 and "not valid TOML" in out.stderr


def test_config_fields_can_be_overridden_from_the_environment(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(fast_config())
    env = {**os.environ, "KTFED_RUN__FEDERATION__ROUNDS": "7", "KTFED_RUN__DATA__PARTITION__ALPHA": "0.25",
           "KTFED_RUN__MODEL__ADAPTER": "lora"}
    out = subprocess.run([sys.executable, "-m", "ktfed", "config", "check", str(config)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["federation"]["rounds"] == 7 and resolved["data"]["partition"]["alpha"] == 0.25
    assert resolved["model"]["adapter"] == "lora"
    env = {**os.environ, "KTFED_RUN__TRAIN__LR": "fast"}
    out = subprocess.run([sys.executable, "-m", "ktfed", "config", "check", str(config)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "KTFED_RUN__TRAIN__LR" in out.stderr and "train.lr: expected a number" in out.stderr


def test_coordinator_refuses_an_invalid_config_file(tmp_path, pki_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text(fast_config().replace("min_sites = 2", "min_sites = 9"))
    out = ktfed("coordinator", "serve", "--listen", "127.0.0.1:0", "--state", tmp_path / "state",
                "--pki", pki_dir, "--config", bad)
    assert out.returncode == 2
    assert "federation.min_sites" in out.stderr and str(bad) in out.stderr


def test_coordinator_refuses_a_corrupted_checkpoint_and_names_it(federation):
    config = federation.write_config(fast_config(rounds=30, min_sites=3))
    federation.start_coordinator(config)
    federation.wait_serving()
    for site in SITES:
        federation.start_participant(site)
    federation.wait_rounds(2)
    federation.shutdown()
    run_dir = next((federation.workdir / "coordinator" / "runs").iterdir())
    last = sorted(run_dir.glob("round-*.safetensors"))[-1]
    data = bytearray(last.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the tensor payload
    last.write_bytes(bytes(data))
    out = ktfed(*federation.coordinator_command()[3:])
    assert out.returncode == 2
    assert "refusing to start" in out.stderr and str(last) in out.stderr and "digest" in out.stderr
    last.write_bytes(b"not a safetensors file")
    out = ktfed(*federation.coordinator_command()[3:])
    assert out.returncode == 2 and str(last) in out.stderr and "cannot be read" in out.stderr


def test_participant_needs_credentials_or_insecure(tmp_path):
    out = ktfed("participant", "run", "--site", "site-a", "--coordinator", "127.0.0.1:1")
    assert out.returncode != 0 and "--insecure" in out.stderr


def test_operator_starts_a_run_and_reads_its_status(federation):
    federation.start_coordinator()  # no run yet: the operator starts one
    federation.wait_serving()
    args = ["--coordinator", federation.address, "--pki", federation.pki]
    out = ktfed("run", "status", *args)
    assert out.returncode == 1 and "UNAVAILABLE: no run has been started" in out.stderr
    config = federation.write_config(fast_config(rounds=2, min_sites=3))
    out = ktfed("run", "start", "--config", config, *args)
    assert out.returncode == 0 and "0/2 rounds" in out.stdout, out.stderr
    for site in SITES:
        federation.start_participant(site)
    federation.wait_rounds(2)
    out = ktfed("run", "status", "--json", *args)
    assert out.returncode == 0
    import json
    status = json.loads(out.stdout)
    assert status["state"] == "finished" and [r["round"] for r in status["rounds"]] == [1, 2]
    assert {p["id"]: p["rounds_contributed"] for p in status["sites"]} == {s: 2 for s in SITES}
    # The operator's one-look command, configured through the environment as a container would be.
    env = {**os.environ, "KTFED_COORDINATOR": federation.address, "KTFED_PKI": str(federation.pki)}
    out = subprocess.run([sys.executable, "-m", "ktfed", "status"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"coordinator {federation.address}: SERVING" in out.stdout and "finished, 2/2 rounds" in out.stdout
    assert all(site in out.stdout for site in SITES)
    env["KTFED_INSECURE"] = "maybe"
    out = subprocess.run([sys.executable, "-m", "ktfed", "status"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 2 and "KTFED_INSECURE='maybe': expected true or false" in out.stderr
    bad = federation.write_config(fast_config().replace("epochs = 2", "epochs = 0"))
    out = ktfed("run", "start", "--config", bad, *args)
    assert out.returncode == 2 and "train.epochs" in out.stderr


def test_insecure_mode_runs_without_certificates(tmp_path):
    from ktfed.launcher import free_port
    import subprocess as sp
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "run.toml"
    config.write_text(fast_config(rounds=1, min_sites=1, sites=["site-a"]))
    coord = sp.Popen([sys.executable, "-m", "ktfed", "coordinator", "serve", "--insecure", "--listen", address,
                      "--state", str(tmp_path / "c"), "--config", str(config)], stderr=sp.PIPE, text=True)
    try:
        out = ktfed("participant", "run", "--insecure", "--site", "site-a", "--coordinator", address,
                    "--state", tmp_path / "p", "--backoff-max", "0.5")
        assert out.returncode == 0, out.stderr
        assert "plaintext channel" in out.stderr
    finally:
        coord.terminate()
        _, err = coord.communicate(timeout=20)
    assert "WITHOUT TLS" in err
