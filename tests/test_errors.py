"""Errors a person can act on: one line naming the file, port, folder or variable, and the
documented exit code (ktfed/exits.py, README "Exit codes"); clean stops on Ctrl-C and SIGTERM.
Real `python -m ktfed` processes wherever a process is what a person runs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktfed import exits
from ktfed.cli import main
from ktfed.launcher import free_port
from tests.conftest import LocalFederation, fast_config

REPO = Path(__file__).resolve().parent.parent


def ktfed(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktfed", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})})


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:") or "error:" in line]
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- missing files, bad flags, bad variables ---------------------------------------------------

@pytest.mark.parametrize("argv, name", [
    (["participant", "run", "--site", "site-a"], "site-a"),
    (["run", "status"], "operator"),
    (["status"], "operator"),
])
def test_a_missing_key_or_certificate_is_one_line_naming_the_files(tmp_path, argv, name):
    done = ktfed(*argv, "--pki", str(tmp_path / "nopki"), "--state", str(tmp_path / "s")) if argv[0] == "participant" \
        else ktfed(*argv, "--pki", str(tmp_path / "nopki"))
    assert done.returncode == exits.INVALID, done.stderr
    line = one_line_error(done)
    assert f"{tmp_path / 'nopki'}/issued/{name}.key" in line and "ktfed pki" in line


def test_a_missing_key_alone_is_named(tmp_path, pki_dir):
    pki = tmp_path / "pki"
    (pki / "issued").mkdir(parents=True)
    for name in ("ca.crt", "issued/operator.crt"):
        (pki / name).write_bytes((pki_dir / name).read_bytes())
    assert main(["run", "status", "--pki", str(pki)]) == exits.INVALID


def test_cli_wording_of_pki_mistakes(tmp_path, capsys):
    pki = tmp_path / "pki"
    assert main(["pki", "issue", "--dir", str(pki), "--role", "participant", "--name", "site-a"]) == exits.INVALID
    assert f"run `ktfed pki init --dir {pki}` first" in capsys.readouterr().err
    assert main(["pki", "init", "--dir", str(pki)]) == 0
    assert main(["pki", "init", "--dir", str(pki)]) == exits.INVALID
    err = capsys.readouterr().err
    assert "give --force" in err and "force=True" not in err


def test_a_bad_variable_is_named_as_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("KTFED_METRICS_LISTEN", "bad")
    with pytest.raises(SystemExit) as stop:
        main(["coordinator", "serve", "--insecure"])
    assert stop.value.code == exits.INVALID
    assert "KTFED_METRICS_LISTEN='bad'" in capsys.readouterr().err
    # the same value on the command line is the flag's fault, and other commands do not care
    with pytest.raises(SystemExit):
        main(["coordinator", "serve", "--insecure", "--metrics-listen", "nonsense"])
    err = capsys.readouterr().err
    assert "--metrics-listen" in err and "KTFED_METRICS_LISTEN" not in err
    assert main(["privacy", "ledger", "--site", "a", "--state", "/nonexistent"]) == exits.INVALID


def test_version():
    done = ktfed("--version")
    assert done.returncode == 0 and done.stdout.startswith("ktfed 0.")


def test_flags_have_help():
    for argv, flag in ((["coordinator", "serve"], "--listen HOST:PORT"), (["participant", "run"], "--coordinator HOST:PORT"),
                       (["run", "start"], "--config FILE")):
        options = ktfed(*argv, "--help").stdout.split("options:", 1)[1]
        described = options.split(f"  {flag}", 1)[1].split("\n  -", 1)[0]
        assert len(described.split()) > 3, (flag, described)


# -- ports and state folders -------------------------------------------------------------------

def test_a_port_in_use_names_the_flag_or_the_variable(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        address = f"127.0.0.1:{held.getsockname()[1]}"
        done = ktfed("coordinator", "serve", "--insecure", "--state", str(tmp_path / "c"), "--listen", address)
        assert done.returncode == exits.INVALID
        line = one_line_error(done)
        assert f"--listen {address}" in line and "in use" in line
        done = ktfed("coordinator", "serve", "--insecure", "--state", str(tmp_path / "c"),
                     "--listen", f"127.0.0.1:{free_port()}", env={"KTFED_METRICS_LISTEN": address})
        assert done.returncode == exits.INVALID
        assert f"KTFED_METRICS_LISTEN {address}" in one_line_error(done)


def test_a_second_coordinator_on_one_state_folder_exits_4(tmp_path, pki_dir):
    fed = LocalFederation(tmp_path, pki_dir)
    try:
        fed.start_coordinator(fed.write_config(fast_config(rounds=50, timeout=30)))
        fed.wait_serving()
        done = ktfed("coordinator", "serve", "--pki", str(pki_dir), "--state", str(tmp_path / "coordinator"),
                     "--listen", f"127.0.0.1:{free_port()}")
        assert done.returncode == exits.IN_USE, done.stderr
        line = one_line_error(done)
        assert str(tmp_path / "coordinator") in line and "another process" in line
    finally:
        fed.close()


def test_a_second_agent_on_one_state_folder_exits_4(tmp_path, pki_dir):
    state, nowhere = tmp_path / "site-a", f"127.0.0.1:{free_port()}"  # the audit log opens before any connection
    argv = [sys.executable, "-m", "ktfed", "participant", "run", "--site", "site-a", "--pki", str(pki_dir),
            "--state", str(state), "--coordinator", nowhere, "--log-file", str(tmp_path / "first.log")]
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (state / "heartbeat.json").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        done = ktfed("participant", "run", "--site", "site-a", "--pki", str(pki_dir), "--state", str(state),
                     "--coordinator", nowhere, "--log-file", str(tmp_path / "second.log"))
        assert done.returncode == exits.IN_USE
        line = one_line_error(done)
        assert f"{state}/audit" in line and "another agent" in line
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == exits.OK


def test_output_closed_early_is_silent(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(fast_config())
    proc = subprocess.Popen([sys.executable, "-m", "ktfed", "config", "check", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has what it wants
    err = proc.stderr.read().decode()
    assert proc.wait(120) == exits.OUTPUT_CLOSED and err == "", err


# -- privacy ---------------------------------------------------------------------------------

def test_the_ledger_of_another_site_is_an_error(tmp_path, capsys):
    from security.dp.ledger import LEDGER_FILE, PrivacyLedger

    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, "site-a")
    ledger.record_decline(run_id="r", round_no=1, attempt_id="t", reason="budget", spent=1.0, would_be=2.5,
                          budget=2.0, accountant="prv")
    ledger.close()
    assert main(["privacy", "ledger", "--site", "site-x", "--state", str(tmp_path)]) == exits.INVALID
    err = capsys.readouterr().err
    assert "site-a's, not site-x's" in err
    assert main(["privacy", "ledger", "--site", "site-a", "--state", str(tmp_path), "--json"]) == 0


def test_privacy_plan_takes_delta_from_the_run(tmp_path, capsys):
    import json

    config = tmp_path / "run.toml"
    config.write_text(fast_config(extra="[privacy]\nenabled = true\ntarget_epsilon = 4.0\ndelta = 2e-6\n"))
    argv = ["privacy", "plan", "--samples", "500", "--batch", "50", "--rounds", "2", "--epsilon", "4", "--json"]
    from unittest import mock

    with mock.patch("ktfed.privacy_plan._proxy_accuracy", return_value=0.5):  # the accuracy proxy is not tested here
        assert main([*argv, "--config", str(config)]) == 0
        assert json.loads(capsys.readouterr().out)["delta"] == 2e-6
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["delta"] == pytest.approx(1 / 5000)


# -- Ctrl-C and SIGTERM ------------------------------------------------------------------------

def _wait_for(path: Path, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} not in {path}"
        time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_a_participant_and_the_coordinator_cleanly(tmp_path, pki_dir):
    fed = LocalFederation(tmp_path, pki_dir)
    try:
        # rounds wait for a second site that never comes: the participant is idle on its assignment stream
        fed.start_coordinator(fed.write_config(fast_config(rounds=50, timeout=30, min_sites=2)))
        fed.wait_serving()
        log = tmp_path / "logs" / "site-a.log"
        for signum, code, said in ((signal.SIGINT, exits.INTERRUPTED, "stopped by Ctrl-C"),
                                   (signal.SIGTERM, exits.OK, "stopped by SIGTERM")):
            proc = fed.start_participant("site-a")
            _wait_for(log, "joined run", 120)
            time.sleep(0.5)
            proc.send_signal(signum)
            assert proc.wait(30) == code
            out = (tmp_path / "logs" / "site-a.out").read_text()
            assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
            assert said in out and said in log.read_text()
            assert "going away" not in log.read_text()
            log.write_text("")
            (tmp_path / "logs" / "site-a.out").write_text("")
        fed.coordinator.send_signal(signal.SIGINT)
        assert fed.coordinator.wait(30) == exits.INTERRUPTED
        assert "stopped by Ctrl-C" in fed.log() and "Traceback" not in fed.log()
        out = (tmp_path / "logs" / "coordinator.out").read_text()
        assert "Traceback" not in out, out
    finally:
        fed.close()


@pytest.mark.slow
def test_sigterm_mid_round_stops_after_the_round(tmp_path, pki_dir):
    """A site stopped while it holds a round's update finishes that round first (the fault holds
    the upload until the stop is asked for), then stops without a word about the coordinator."""
    fed = LocalFederation(tmp_path, pki_dir)
    try:
        fed.start_coordinator(fed.write_config(fast_config(rounds=50, timeout=60, min_sites=2)))
        fed.wait_serving()
        fed.start_participant("site-a")
        proc = fed.start_participant("site-b", env={"KTFED_FAULT_PAUSE_BEFORE_UPLOAD_S": "60"})
        log = tmp_path / "logs" / "site-b.log"
        _wait_for(log, "fault injection: pausing", 120)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(45) == exits.OK
        assert time.monotonic() - started < 45  # not the 60 s the fault would hold it
        text = log.read_text()
        assert "stopped by SIGTERM" in text and "going away" not in text
        assert "Traceback" not in (tmp_path / "logs" / "site-b.out").read_text()
    finally:
        fed.close()
