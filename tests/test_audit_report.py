"""`ktfed audit verify` and `ktfed audit report`: exit codes, the first bad entry, and a report that
is self-contained and renders in a real browser (headless Chromium)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ktfed import audit_cmd
from tests.test_audit_log import make_audit_pki, read_lines, simulate_run, write_lines

CHROMIUM = Path("/usr/bin/chromium")


def run_cli(argv: list[str]) -> int:
    """The `ktfed audit` commands through their own parser (ktfed.cli adds the same ones)."""
    parser = argparse.ArgumentParser(prog="ktfed")
    audit_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def federation_logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-cli")
    pki = make_audit_pki(root / "pki")
    return pki, simulate_run(root / "logs", pki, rounds=4)


def test_verify_exit_codes_and_first_bad_entry(tmp_path, federation_logs, capsys):
    pki, dirs = federation_logs
    dirs_args = [str(d) for d in dirs.values()]
    assert run_cli(["audit", "verify", *dirs_args, "--pki", str(pki)]) == 0
    assert "audit verify: OK: 3 log(s)" in capsys.readouterr().out

    bad = tmp_path / "site-a"
    shutil.copytree(dirs["site-a"], bad)
    lines = read_lines(bad)
    write_lines(bad, lines[:3] + lines[4:])
    assert run_cli(["audit", "verify", str(dirs["coordinator"]), str(bad), "--ca", str(pki / "ca.crt")]) == 1
    out = capsys.readouterr().out
    assert f"first bad entry: {bad / 'audit.jsonl'} seq 3 (line 4): expected seq 3 here, found seq 4" in out

    assert run_cli(["audit", "verify", *dirs_args, "--json", "--pki", str(pki)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_verify_usage_errors(tmp_path, federation_logs, capsys):
    pki, dirs = federation_logs
    with pytest.raises(SystemExit, match="give --ca"):
        run_cli(["audit", "verify", str(dirs["site-a"])])
    assert run_cli(["audit", "verify", str(dirs["site-a"]), "--ca", str(tmp_path / "nope.crt")]) == 2
    assert "no CA certificate" in capsys.readouterr().err
    assert run_cli(["audit", "verify", str(tmp_path), "--pki", str(pki)]) == 1
    assert "not an audit log (no audit.jsonl in it" in capsys.readouterr().out


def test_report_is_self_contained_and_complete(tmp_path, federation_logs, capsys):
    pki, dirs = federation_logs
    out = tmp_path / "report"
    assert run_cli(["audit", "report", *map(str, dirs.values()), "--pki", str(pki), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert {p.name for p in out.iterdir()} == {"index.html", "report.json", "epsilon.png", "bytes.png"}
    # nothing is fetched from anywhere: no URLs, no external stylesheets or scripts
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"(https?:|//[a-z]|url\()", text)
    assert "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 2
    assert "VERIFIED: 3 log(s)" in page and "Threat model" in page
    data = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in data["privacy"]["site-a"]] == [1, 2, 3, 4]
    update = next(c for c in data["boundaries"] if c["sender"] == "site-a" and c["message"] == "update")
    assert update["count"] == 4 and update["bytes"] == 4 * 3072 and "layers.0.w_b" in update["tensors"]
    assert data["countersignatures"]["site-b"]["rounds"] == [1, 2, 3, 4]
    assert len(data["secagg"]) == 4
    certs = {p["producer"]: p["certificates"][0]["fingerprint"] for p in data["manifest"]["producers"]}
    for name, fp in certs.items():
        assert fp in page and len(fp) == 64


def test_report_says_a_site_that_recorded_no_policy_was_not_judged(tmp_path, federation_logs, capsys):
    # the simulated sites log no `config` entry, so no policy: the report and the CLI say so
    pki, dirs = federation_logs
    out = tmp_path / "report"
    assert run_cli(["audit", "report", *map(str, dirs.values()), "--pki", str(pki), "--out", str(out)]) == 0
    assert "site-a: no site policy recorded (4 messages sent unjudged)" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert [(s["site"], s["status"]) for s in data["site_policies"]] == [("site-a", "none"), ("site-b", "none")]
    assert "not judged: no site policy recorded (4 messages sent)" in (out / "index.html").read_text()


def test_report_of_tampered_logs_says_so(tmp_path, federation_logs):
    pki, dirs = federation_logs
    bad = tmp_path / "coordinator"
    shutil.copytree(dirs["coordinator"], bad)
    lines = read_lines(bad)
    lines[2] = lines[2].replace(b'"round":1', b'"round":9')
    write_lines(bad, lines)
    out = tmp_path / "report"
    assert run_cli(["audit", "report", str(bad), str(dirs["site-a"]), "--pki", str(pki), "--out", str(out)]) == 1
    page = (out / "index.html").read_text()
    assert "VERIFICATION FAILED" in page and "hash does not match the entry&#x27;s content" in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium is not installed "
                    "(Debian package `chromium`, /usr/bin/chromium): the report is not rendered")
def test_report_renders_in_headless_chromium(tmp_path, federation_logs):
    pki, dirs = federation_logs
    out = tmp_path / "report"
    assert run_cli(["audit", "report", *map(str, dirs.values()), "--pki", str(pki), "--out", str(out)]) == 0
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    url = (out / "index.html").resolve().as_uri()
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run([str(CHROMIUM), *flags, f"--screenshot={shot}", "--window-size=1200,2000", url],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    # not blank: a page of text, tables and plots has many distinct shades and a spread of values
    assert pixels[..., :3].std() > 0.05 and len({tuple(p) for p in pixels[::23, ::23, :3].reshape(-1, 3)}) > 20
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, env=env)
    assert dom.returncode == 0 and "Privacy audit report" in dom.stdout and "VERIFIED" in dom.stdout
