"""The audit logs of a real run: every producer's chain verifies offline against the CA, the
uploads match at both ends, the report renders, and tampering with a real log is caught."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from security.audit import verify
from tests.conftest import fast_config


def _dirs(fed, sites=("site-a", "site-b", "site-c")):
    return [fed.workdir / "coordinator" / "audit"] + [fed.workdir / "sites" / s / "audit" for s in sites]


def verify_strictly(dirs, ca):
    """A run that finished cleanly verifies strictly: every log given, the run sealed by the
    coordinator and the seal countersigned by every site, nothing unpinned."""
    result = verify(dirs, ca)
    assert result.ok, result.summary()
    return result


def _ktfed(*args):
    return subprocess.run([sys.executable, "-m", "ktfed", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_real_run_audit_logs_verify_and_tampering_is_named(federation, tmp_path):
    federation.start_coordinator(federation.write_config(fast_config(rounds=2, min_sites=3, epochs=1)))
    federation.wait_serving()
    for site in ("site-a", "site-b", "site-c"):
        federation.start_participant(site)
    federation.wait_for(lambda: (s := federation.status()).state == "finished" and s, 180, "the run to finish")
    for proc in federation.participants.values():
        proc.wait(30)

    result = verify_strictly(_dirs(federation), federation.pki / "ca.crt")
    coordinator = next(v for v in result.logs if v.producer == "coordinator")
    received = [e.body for e in coordinator.entries if e.kind == "boundary" and e.body["message"] == "update"]
    assert len(received) == 6 and all(b["direction"] == "receive" and b["tensors"] for b in received)
    # one per upload, and each site's countersignature of the seal
    assert sum(e.kind == "countersignature" for e in coordinator.entries) == 6 + 3
    assert sum(e.kind == "seal" for e in coordinator.entries) == 1
    done = _ktfed("audit", "report", *_dirs(federation), "--pki", federation.pki, "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr
    json.loads((tmp_path / "report" / "report.json").read_text())
    assert (tmp_path / "report" / "index.html").stat().st_size > 1000

    # flip one byte inside a site's update receipt in the coordinator's log: named by seq
    path = federation.workdir / "coordinator" / "audit" / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    target = next(i for i, line in enumerate(lines) if b'"message":"update"' in line)
    line = bytearray(lines[target])
    at = line.index(b'"sha256":"') + 12
    line[at] = ord("0") if line[at] != ord("0") else ord("1")
    lines[target] = bytes(line)
    path.write_bytes(b"".join(lines))
    done = _ktfed("audit", "verify", *_dirs(federation), "--pki", federation.pki)
    assert done.returncode == 1
    assert f"seq {target}" in done.stdout + done.stderr, done.stdout + done.stderr
