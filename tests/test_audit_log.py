"""The audit log itself: appends, chain, signatures, threads, reopening, torn tails, countersigning.

The helpers at the top (a private CA, a simulated federation's logs, rewriting a log with its own
key) are shared by the other test_audit_* files.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from security.audit import (AuditError, AuditLog, CountersignatureError, TornTailError, as_float, verify)
from security.audit.entry import Entry, entry_hash, sign_hash
from security.pki import init_ca, issue
from security.pki import primitives as pki

SITES = ("site-a", "site-b")


# ---------------------------------------------------------------- shared helpers

def make_audit_pki(path: Path, names=("site-a", "site-b", "site-c", "site-x")) -> Path:
    init_ca(path)
    issue(path, "coordinator", "coordinator")
    for name in names:
        issue(path, name, "participant")
    return path


def key_of(pki_dir: Path, name: str) -> bytes:
    return (pki_dir / "issued" / f"{name}.key").read_bytes()


def cert_of(pki_dir: Path, name: str) -> bytes:
    return (pki_dir / "issued" / f"{name}.crt").read_bytes()


def open_log(pki_dir: Path, directory: Path, name: str, **kw) -> AuditLog:
    return AuditLog.open(directory, name, key_of(pki_dir, name), cert_of(pki_dir, name), **kw)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


TENSORS = [{"name": "layers.0.w_a", "shape": [32, 8], "dtype": "float32", "nbytes": 1024},
           {"name": "layers.0.w_b", "shape": [8, 64], "dtype": "float32", "nbytes": 2048}]


def simulate_run(root: Path, pki_dir: Path, rounds: int = 3, sites=SITES, run: str = "run-1",
                 close: bool = True, folders: dict[str, Path] | None = None) -> dict[str, Path]:
    """The logs a coordinator and its sites would write for `rounds` rounds, in the order the
    services write them: task out (carrying the coordinator's head), task in, countersign, DP step,
    update out; then at the coordinator update in, countersignature recorded, SecAgg result. With
    `close`, the run ends as the services end it: the coordinator seals the run, each site
    countersigns the seal (RunFinished carries its head, Leave the token), and every log closes.
    `folders`: where a producer's log is (an existing one is resumed, as by a restarted service)."""
    dirs = {name: (folders or {}).get(name, root / name) for name in ("coordinator", *sites)}
    coord = open_log(pki_dir, dirs["coordinator"], "coordinator")
    logs = {s: open_log(pki_dir, dirs[s], s) for s in sites}
    coord.log_config(run=run, config={"rounds": rounds, "secagg": {"enabled": True}}, git_commit="0" * 40)
    for rnd in range(1, rounds + 1):
        head = coord.head()
        tokens = {}
        for s, log in logs.items():
            task = dict(run=run, round=rnd, sender="coordinator", receiver=s, message="assignment",
                        sha256=digest(f"global-{rnd}"), tensors=TENSORS)
            coord.log_boundary(direction="send", **task)
            log.log_boundary(direction="receive", **task)
            tokens[s] = log.countersign(head, subject="coordinator", run=run, round=rnd)
            log.log_dp(run=run, round=rnd, level="record", sample_rate=0.1, noise_multiplier=1.1, steps=10,
                       max_grad_norm=1.0, delta=1e-5, epsilon_round=0.4, epsilon_cumulative=0.4 * rnd ** 0.6,
                       budget=3.0, accountant="prv", accountant_version="opacus 1.6.0")
            log.log_boundary(direction="send", run=run, round=rnd, sender=s, receiver="coordinator",
                             message="update", sha256=digest(f"{s}-{rnd}"), tensors=TENSORS)
        for s in logs:
            coord.log_boundary(direction="receive", run=run, round=rnd, sender=s, receiver="coordinator",
                               message="update", sha256=digest(f"{s}-{rnd}"), tensors=TENSORS)
            coord.record_countersignature(tokens[s], cert_of(pki_dir, s))
        coord.log_secagg(run=run, round=rnd, event="unmasked", threshold=2, roster=sites, survivors=sites,
                         reconstructed=[{"secret": "self_mask", "of": s} for s in sites])
    if close:
        seal = coord.seal(run=run, rounds=rounds, reason="finished")
        for s, log in logs.items():
            token = log.countersign(seal, subject="coordinator", run=run, round=rounds)
            coord.record_countersignature(token, cert_of(pki_dir, s))
        for log in (coord, *logs.values()):
            log.close("end of run")
    return dirs


def read_lines(directory: Path) -> list[bytes]:
    return (directory / "audit.jsonl").read_bytes().splitlines()


def write_lines(directory: Path, lines: list[bytes]) -> None:
    (directory / "audit.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def rewrite_log(directory: Path, key_pem: bytes, keep=lambda entry: True, edit=lambda entry: entry.body) -> None:
    """What a producer holding its own key can do: drop or edit entries, then re-chain and re-sign."""
    key = pki.load_private_key(key_pem)
    out, prev = [], "0" * 64
    for line in read_lines(directory):
        old = Entry(**json.loads(line))
        if not keep(old):
            continue
        core = {"seq": len(out), "time": old.time, "producer": old.producer, "kind": old.kind,
                "body": edit(old), "prev_hash": prev}
        h = entry_hash(core)
        out.append(Entry(**core, hash=h, signature=sign_hash(key, h)).to_line()[:-1])
        prev = h
    write_lines(directory, out)


@pytest.fixture(scope="module")
def audit_pki(tmp_path_factory) -> Path:
    return make_audit_pki(tmp_path_factory.mktemp("audit-pki") / "pki")


# ---------------------------------------------------------------- tests

def test_entries_chain_and_verify(tmp_path, audit_pki):
    log = open_log(audit_pki, tmp_path / "a", "site-a")
    first = log.head()
    e = log.append("note", {"epsilon": 0.1, "shape": (2, 3), "who": "site-a"})
    assert e.seq == first.seq + 1 and e.prev_hash == first.hash and log.head() == e.head
    # floats are stored as their shortest round-trip text: no encoder can disagree about them
    assert e.body == {"epsilon": "0.1", "shape": [2, 3], "who": "site-a"} and as_float(e.body["epsilon"]) == 0.1
    log.close()
    lines = read_lines(tmp_path / "a")
    assert [json.loads(x)["kind"] for x in lines] == ["open", "note", "close"]
    assert verify([tmp_path / "a"], audit_pki / "ca.crt", partial=True).ok


def test_concurrent_appends_keep_one_chain(tmp_path, audit_pki):
    log = open_log(audit_pki, tmp_path / "c", "coordinator")

    def work(i):
        for j in range(40):
            log.append("note", {"thread": i, "j": j})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert [json.loads(x)["seq"] for x in read_lines(tmp_path / "c")] == list(range(162))
    assert verify([tmp_path / "c"], audit_pki / "ca.crt", partial=True).ok


def test_reopen_resumes_and_records_a_rotated_certificate(tmp_path, audit_pki):
    open_log(audit_pki, tmp_path / "s", "site-c").close()
    old_fp = pki.fingerprint(pki.load_cert(cert_of(audit_pki, "site-c")))
    issue(audit_pki, "site-c", "participant")            # rotation: a new key and certificate
    log = open_log(audit_pki, tmp_path / "s", "site-c")
    log.append("note", {"after": "rotation"})
    log.close()
    kinds = [json.loads(x) for x in read_lines(tmp_path / "s")]
    resume = next(k for k in kinds if k["kind"] == "resume")
    assert resume["body"]["previous_certificate"] == old_fp and resume["body"]["after_close"] is True
    assert resume["body"]["certificate"] != old_fp
    assert len(list((tmp_path / "s" / "certs").glob("*.pem"))) == 2
    assert verify([tmp_path / "s"], audit_pki / "ca.crt", partial=True).ok


def test_open_refuses_a_wrong_identity_a_foreign_log_and_a_second_writer(tmp_path, audit_pki):
    with pytest.raises(AuditError, match="not the producer"):
        AuditLog.open(tmp_path / "x", "site-b", key_of(audit_pki, "site-a"), cert_of(audit_pki, "site-a"))
    with pytest.raises(Exception, match="do not belong together"):
        AuditLog.open(tmp_path / "x", "site-a", key_of(audit_pki, "site-b"), cert_of(audit_pki, "site-a"))
    log = open_log(audit_pki, tmp_path / "a", "site-a")
    with pytest.raises(AuditError, match="already open"):
        open_log(audit_pki, tmp_path / "a", "site-a")
    log.close()
    with pytest.raises(AuditError, match="producer 'site-a'"):
        open_log(audit_pki, tmp_path / "a", "site-b")


def test_open_refuses_to_extend_a_tampered_chain(tmp_path, audit_pki):
    log = open_log(audit_pki, tmp_path / "a", "site-a")
    log.append("note", {"n": 1})
    log.close()
    lines = read_lines(tmp_path / "a")
    lines[1] = lines[1].replace(b'"n":1', b'"n":2')
    write_lines(tmp_path / "a", lines)
    with pytest.raises(AuditError, match="line 2: hash does not match"):
        open_log(audit_pki, tmp_path / "a", "site-a")


def test_torn_tail_is_reported_never_silently_fixed(tmp_path, audit_pki):
    log = open_log(audit_pki, tmp_path / "a", "site-a")
    log.append("note", {"n": 1})
    log.close(None)                                   # as after a crash: no close entry
    path = tmp_path / "a" / "audit.jsonl"
    fragment = b'{"body":{"n":2},"hash":"ab'
    path.write_bytes(path.read_bytes() + fragment)     # a crash in the middle of a write
    before = path.read_bytes()
    with pytest.raises(TornTailError, match="line 3 is torn") as err:
        open_log(audit_pki, tmp_path / "a", "site-a")
    assert err.value.fragment == fragment and path.read_bytes() == before
    result = verify([tmp_path / "a"], audit_pki / "ca.crt", partial=True)
    assert not result.ok and result.first.line == 3 and "torn" in result.first.message
    # the explicit recovery keeps the fragment and says so in the signed chain
    log = open_log(audit_pki, tmp_path / "a", "site-a", recover_torn=True)
    log.close()
    assert (tmp_path / "a" / "audit.jsonl.torn-1").read_bytes() == fragment
    torn = next(json.loads(x) for x in read_lines(tmp_path / "a") if json.loads(x)["kind"] == "torn_tail")
    assert torn["body"] == {"line": 3, "bytes": len(fragment), "sha256": hashlib.sha256(fragment).hexdigest(),
                            "quarantined_to": "audit.jsonl.torn-1"}
    assert verify([tmp_path / "a"], audit_pki / "ca.crt", partial=True).ok


def test_bad_bodies_and_reserved_kinds_are_refused(tmp_path, audit_pki):
    log = open_log(audit_pki, tmp_path / "a", "site-a")
    with pytest.raises(AuditError, match="not a finite number"):
        log.append("note", {"x": float("nan")})
    with pytest.raises(AuditError, match="written only by AuditLog"):
        log.append("countersign", {})
    with pytest.raises(AuditError, match="must match"):
        log.append("Bad Kind", {})
    with pytest.raises(AuditError, match="must name site-a as the sender"):
        log.log_boundary(run="r", round=1, direction="send", sender="site-b", receiver="coordinator",
                         message="update", sha256="00" * 32)
    log.close()


def test_countersignature_round_trip_and_refusals(tmp_path, audit_pki):
    coord = open_log(audit_pki, tmp_path / "c", "coordinator")
    site = open_log(audit_pki, tmp_path / "a", "site-a")
    head = coord.head()
    token = site.countersign(head, subject="coordinator", run="r", round=1)
    recorded = coord.record_countersignature(token, cert_of(audit_pki, "site-a"))
    assert recorded.body["token"]["subject_head"] == head.to_dict()
    assert recorded.body["token"]["signer_head"]["seq"] == site.head().seq - 1
    # a head the coordinator never had, and a signature checked against the wrong certificate
    bad = site.countersign((head.seq, "f" * 64), subject="coordinator", run="r", round=2)
    with pytest.raises(CountersignatureError, match="this log has"):
        coord.record_countersignature(bad)
    good = site.countersign(coord.head(), subject="coordinator", run="r", round=3)
    with pytest.raises(CountersignatureError, match="the certificate given is 'site-b'"):
        coord.record_countersignature(good, cert_of(audit_pki, "site-b"))
    for log in (coord, site):
        log.close()
    refusals = [json.loads(x)["body"] for x in read_lines(tmp_path / "c") if json.loads(x)["kind"] == "refusal"]
    assert [r["peer"] for r in refusals] == ["site-a", "site-a"]


def test_simulated_federation_verifies(tmp_path, audit_pki):
    dirs = simulate_run(tmp_path, audit_pki)
    result = verify(list(dirs.values()), audit_pki / "ca.crt")
    assert result.ok, result.summary()
    assert not result.warnings
    assert {v.producer for v in result.logs} == {"coordinator", "site-a", "site-b"}


def test_sync_on_head_defers_fsync_but_keeps_the_chain(tmp_path, audit_pki):
    with pytest.raises(AuditError, match="sync must be one of"):
        open_log(audit_pki, tmp_path / "x", "coordinator", sync="never")
    log = open_log(audit_pki, tmp_path / "c", "coordinator", sync="on_head")
    for i in range(20):
        log.append("note", {"i": i})
    head = log.head()                      # flushed before it is handed out
    assert head.seq == 20 and len(read_lines(tmp_path / "c")) == 21
    log.close()
    assert verify([tmp_path / "c"], audit_pki / "ca.crt", partial=True).ok
