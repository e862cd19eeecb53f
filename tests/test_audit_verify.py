"""Tampering with audit logs is caught, and the verifier names the entry.

Each case starts from the honest logs of a simulated 3-round federation (coordinator, site-a,
site-b) and changes them the way an attacker, or a producer holding its own key, could.
"""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from security.audit import AuditError, verify
from security.audit.entry import entry_hash, sign_hash
from security.pki import init_ca, issue
from security.pki import primitives as pki
from tests.test_audit_log import (cert_of, digest, key_of, make_audit_pki, open_log, read_lines, rewrite_log,
                                  simulate_run, write_lines)


@pytest.fixture(scope="module")
def audit_pki(tmp_path_factory):
    return make_audit_pki(tmp_path_factory.mktemp("audit-pki") / "pki")


@pytest.fixture(scope="module")
def honest(tmp_path_factory, audit_pki):
    return simulate_run(tmp_path_factory.mktemp("honest"), audit_pki)


@pytest.fixture
def logs(tmp_path, honest):
    """A fresh copy of the honest logs to tamper with."""
    out = {}
    for name, src in honest.items():
        out[name] = tmp_path / name
        shutil.copytree(src, out[name])
    return out


def check(logs, audit_pki):
    return verify([logs["coordinator"], logs["site-a"], logs["site-b"]], audit_pki / "ca.crt")


def first_of(result):
    assert not result.ok, "tampering went undetected"
    return result.first


def entries(directory):
    return [json.loads(line) for line in read_lines(directory)]


def test_honest_logs_verify(logs, audit_pki):
    result = check(logs, audit_pki)
    assert result.ok and not result.warnings, result.summary()


def test_a_flipped_byte_anywhere_in_an_entry_names_that_entry(logs, audit_pki):
    lines = read_lines(logs["site-a"])
    target = 5
    original = lines[target]
    # every byte: including the spare bits of the signature's last base64 character
    for pos in range(len(original)):
        flipped = bytearray(original)
        flipped[pos] ^= 0x01
        write_lines(logs["site-a"], lines[:target] + [bytes(flipped)] + lines[target + 1:])
        first = first_of(verify([logs["site-a"]], audit_pki / "ca.crt", partial=True))
        assert first.file.endswith("site-a/audit.jsonl") and first.seq == target and first.line == target + 1, \
            f"byte {pos} ({chr(original[pos])!r}): {first}"


def test_a_deleted_entry_is_named(logs, audit_pki):
    lines = read_lines(logs["site-a"])
    write_lines(logs["site-a"], lines[:4] + lines[5:])
    first = first_of(check(logs, audit_pki))
    assert first.file.endswith("site-a/audit.jsonl") and first.seq == 4
    assert "expected seq 4 here, found seq 5" in first.message


def test_a_reordered_pair_is_named(logs, audit_pki):
    lines = read_lines(logs["coordinator"])
    lines[6], lines[7] = lines[7], lines[6]
    write_lines(logs["coordinator"], lines)
    first = first_of(check(logs, audit_pki))
    assert first.file.endswith("coordinator/audit.jsonl") and first.seq == 6 and "found seq 7" in first.message


def test_a_truncated_coordinator_log_is_caught_by_the_countersignatures(logs, audit_pki):
    # cut the coordinator's log right before the head the sites countersigned in the last round
    last_head = max(e["body"]["subject_head"]["seq"] for e in entries(logs["site-a"]) if e["kind"] == "countersign")
    write_lines(logs["coordinator"], read_lines(logs["coordinator"])[:last_head])
    result = check(logs, audit_pki)
    first = first_of(result)
    assert first.file.endswith("coordinator/audit.jsonl") and first.seq == last_head
    assert any("removed from the end of coordinator's log" in p.message for p in result.errors)


def test_a_truncated_participant_log_is_caught_by_what_the_coordinator_holds(logs, audit_pki):
    seqs = [e["seq"] for e in entries(logs["site-b"]) if e["kind"] == "countersign"]
    write_lines(logs["site-b"], read_lines(logs["site-b"])[:seqs[-1]])   # drops round 3 onwards
    result = check(logs, audit_pki)
    first = first_of(result)
    assert first.file.endswith("site-b/audit.jsonl") and first.seq == seqs[-1]
    assert "removed from the end of site-b's log" in first.message


def test_a_deleted_last_entry_fails_and_partial_reading_only_warns(logs, audit_pki):
    write_lines(logs["site-a"], read_lines(logs["site-a"])[:-1])
    first = first_of(check(logs, audit_pki))
    assert first.file.endswith("site-a/audit.jsonl") and "ends without a close entry" in first.message
    partial = verify([logs["coordinator"], logs["site-a"], logs["site-b"]], audit_pki / "ca.crt", partial=True)
    assert partial.ok and any("ends without a close entry" in w.message for w in partial.warnings)


def test_the_coordinators_seal_and_what_follows_it_cannot_be_cut(logs, audit_pki):
    lines = read_lines(logs["coordinator"])
    # its close carries no claim; the last claim is site-b's countersignature of the seal
    write_lines(logs["coordinator"], lines[:-2])
    first = first_of(check(logs, audit_pki))
    assert first.file.endswith("site-b/audit.jsonl") and "no record of this countersignature" in first.message
    seal = next(i for i, line in enumerate(lines) if b'"kind":"seal"' in line)
    write_lines(logs["coordinator"], lines[:seal])
    result = check(logs, audit_pki)
    assert any("removed from the end of coordinator's log" in p.message for p in result.errors)
    assert any("run run-1 is not sealed" in p.message for p in result.errors)


def test_an_unsealed_run_fails_strictly_and_reads_partially(tmp_path, audit_pki):
    dirs = simulate_run(tmp_path, audit_pki, rounds=2, close=False)
    result = verify(list(dirs.values()), audit_pki / "ca.crt")
    assert not result.ok and any("run run-1 is not sealed" in p.message for p in result.errors)
    # the last round's SecAgg result lies after the last head the sites countersigned
    assert any("'secagg' entry after seq" in p.message and p.file.endswith("coordinator/audit.jsonl")
               for p in result.errors)
    assert verify(list(dirs.values()), audit_pki / "ca.crt", partial=True).ok


def test_a_tail_rewritten_and_re_signed_by_its_producer_is_caught(logs, audit_pki):
    def edit(e):   # the last round's SecAgg result, rewritten by the coordinator with its own key
        if e.kind == "secagg" and e.body["round"] == 3:
            return {**e.body, "survivors": ["site-a"]}
        return e.body

    rewrite_log(logs["coordinator"], key_of(audit_pki, "coordinator"), edit=edit)
    first = first_of(check(logs, audit_pki))
    assert first.file.endswith("coordinator/audit.jsonl") and "rewritten" in first.message


def test_an_entry_a_site_adds_after_its_seal_is_refused(logs, audit_pki):
    lines = read_lines(logs["site-a"])
    rewrite_log(logs["site-a"], key_of(audit_pki, "site-a"), keep=lambda e: e.kind != "close")
    site = open_log(audit_pki, logs["site-a"], "site-a")
    site.log_refusal(run="run-1", round=3, peer="coordinator", message="task", reason="made up later")
    site.log_dp(run="run-1", round=3, level="record", sample_rate=0.1, noise_multiplier=5.0, steps=1,
                max_grad_norm=1.0, delta=1e-5, epsilon_round=0.01, epsilon_cumulative=0.01, budget=3.0,
                accountant="prv", accountant_version="opacus 1.6.0")
    site.close("end of run")
    result = check(logs, audit_pki)
    first = first_of(result)
    assert first.file.endswith("site-a/audit.jsonl") and first.seq == len(lines) + 1
    assert "'dp' entry after seq" in first.message and "no peer's log corroborates" in first.message
    assert any("'refusal' entry" in w.message for w in result.warnings)


def test_a_changed_byte_count_or_tensor_list_is_named(logs, audit_pki):
    def edit(e):
        b = e.body
        if e.kind == "boundary" and b["direction"] == "receive" and b["sender"] == "site-a" and b["round"] == 3:
            return {**b, "bytes": b["bytes"] + 1, "tensors": b["tensors"][:1]}
        return b

    rewrite_log(logs["coordinator"], key_of(audit_pki, "coordinator"), edit=edit)
    problems = [p.message for p in check(logs, audit_pki).errors]
    assert any("received update of run run-1 round 3 from site-a with bytes 3073" in m
               and "tensors differing in layers.0.w_b" in m and "but site-a logged sending bytes 3072" in m
               for m in problems), problems


def test_an_inserted_entry_with_a_valid_hash_but_a_wrong_signature_is_named(logs, audit_pki):
    lines = read_lines(logs["site-a"])
    prev = json.loads(lines[3])
    core = {"seq": 4, "time": prev["time"], "producer": "site-a", "kind": "boundary",
            "body": {"run": "run-1", "round": 1, "direction": "send", "sender": "site-a", "receiver": "coordinator",
                     "message": "update", "sha256": digest("forged"), "bytes": 1, "tensors": []},
            "prev_hash": prev["hash"]}
    h = entry_hash(core)
    # signed by another certificate of the same federation: valid-looking, but not site-a's
    forged = {**core, "hash": h, "signature": sign_hash(pki.load_private_key(key_of(audit_pki, "site-x")), h)}
    line = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
    write_lines(logs["site-a"], lines[:4] + [line] + lines[4:])
    first = first_of(check(logs, audit_pki))
    assert first.file.endswith("site-a/audit.jsonl") and first.seq == 4
    assert "signature does not verify" in first.message


def test_logs_swapped_between_sites_are_named(logs, audit_pki):
    a, b = logs["site-a"] / "audit.jsonl", logs["site-b"] / "audit.jsonl"
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)
    first = first_of(check(logs, audit_pki))
    assert first.file.endswith("site-a/audit.jsonl") and first.seq == 0
    assert "site-b's entry names certificate" in first.message and "site-a's" in first.message


def test_a_coordinator_log_that_omits_an_upload_is_caught(logs, audit_pki):
    def omitted(e):
        b = e.body
        return not (e.kind == "boundary" and b["direction"] == "receive" and b["sender"] == "site-a"
                    and b["round"] == 2)

    # the coordinator holds its own key: the rewritten chain itself verifies (hashes, signatures)...
    rewrite_log(logs["coordinator"], key_of(audit_pki, "coordinator"), keep=omitted)
    alone = verify([logs["coordinator"]], audit_pki / "ca.crt", partial=True)
    assert alone.logs[0].complete
    # ...but the countersignatures it recorded, which it cannot re-sign, no longer fit its chain
    assert all("countersignature of a head this log does not have" in p.message for p in alone.errors)
    result = check(logs, audit_pki)
    first = first_of(result)
    upload = next(e for e in entries(logs["site-a"]) if e["kind"] == "boundary" and e["body"]["round"] == 2
                  and e["body"]["direction"] == "send")
    assert first.file.endswith("site-a/audit.jsonl") and first.seq == upload["seq"]
    assert "coordinator's log has no receipt" in first.message
    # and the rewrite itself shows where the sites' countersignatures pinned the old history
    assert any("history" in p.message and "rewritten" in p.message for p in result.errors)


def test_a_coordinator_rewriting_an_old_entry_with_its_own_key_is_caught(logs, audit_pki):
    def edit(e):
        return {**e.body, "config_sha256": "0" * 64} if e.kind == "config" else e.body

    rewrite_log(logs["coordinator"], key_of(audit_pki, "coordinator"), edit=edit)
    result = check(logs, audit_pki)
    first = first_of(result)
    assert first.file.endswith("coordinator/audit.jsonl") and "rewritten" in first.message


def test_a_different_digest_at_the_receiver_is_named(logs, audit_pki):
    def edit(e):
        b = e.body
        if e.kind == "boundary" and b["direction"] == "receive" and b["sender"] == "site-b" and b["round"] == 1:
            return {**b, "sha256": digest("something else")}
        return b

    rewrite_log(logs["coordinator"], key_of(audit_pki, "coordinator"), edit=edit)
    first = first_of(check(logs, audit_pki))
    assert first.file.endswith("coordinator/audit.jsonl") and "but site-b logged sending sha256" in first.message


# ---------------------------------------------------------------- bad input

def test_a_folder_that_is_not_an_audit_log(tmp_path, audit_pki):
    (tmp_path / "empty").mkdir()
    result = verify([tmp_path / "empty", tmp_path / "missing"], audit_pki / "ca.crt")
    assert [p.message for p in result.errors] == [
        f"{tmp_path / 'empty'}: not an audit log (no audit.jsonl in it, nor in audit/)",
        f"{tmp_path / 'missing'}: no such folder", "no coordinator log was given: strict "
        "verification needs the coordinator's log and every site's (give them all, or read these alone with --partial)"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "audit.jsonl").write_text("hello\n")
    first = verify([tmp_path / "junk"], audit_pki / "ca.crt").first
    assert first.seq == 0 and "unreadable entry: not valid JSON" in first.message


def test_a_log_signed_by_an_unknown_certificate(tmp_path, audit_pki):
    other = tmp_path / "other-pki"
    init_ca(other, common_name="ktfed federation CA")       # same name, different key
    issue(other, "site-a", "participant")
    open_log(other, tmp_path / "a", "site-a").close()
    first = verify([tmp_path / "a"], audit_pki / "ca.crt").first
    assert first.seq == 0 and "federation CA does not vouch" in first.message


def test_mixed_runs_are_refused(tmp_path, logs, audit_pki):
    other = simulate_run(tmp_path / "other", audit_pki, rounds=1, run="run-2")
    result = verify([logs["coordinator"], other["site-a"]], audit_pki / "ca.crt")
    first = first_of(result)
    assert first.file == str(other["site-a"] / "audit.jsonl") and "mixed runs" in first.message


def test_a_ca_that_is_not_a_ca_is_refused(logs, audit_pki):
    with pytest.raises(AuditError, match="is not a CA certificate"):
        verify([logs["site-a"]], cert_of(audit_pki, "site-a"))


def test_a_participant_verified_alone_reports_what_was_not_cross_checked(logs, audit_pki):
    assert "no coordinator log was given" in first_of(verify([logs["site-a"]], audit_pki / "ca.crt")).message
    result = verify([logs["site-a"]], audit_pki / "ca.crt", partial=True)
    assert result.ok
    assert any(w.file == "coordinator" and "not cross-checked" in w.message for w in result.warnings)


def test_a_site_log_left_out_of_the_set_fails_strictly(logs, audit_pki):
    first = first_of(verify([logs["coordinator"], logs["site-a"]], audit_pki / "ca.crt"))
    assert first.file.endswith("coordinator/audit.jsonl")
    assert "site-b took part in run run-1" in first.message and "no log of site-b" in first.message


def test_a_second_log_of_the_same_producer_is_refused(tmp_path, logs, audit_pki):
    shutil.copytree(logs["site-a"], tmp_path / "copy")
    first = first_of(verify([logs["site-a"], tmp_path / "copy"], audit_pki / "ca.crt"))
    assert first.file == str(tmp_path / "copy" / "audit.jsonl") and "a second copy of the same log of 'site-a'" \
        in first.message


def test_an_equivocating_coordinator_is_caught(tmp_path, audit_pki):
    """A coordinator that shows site-b a different history than site-a (a fork) cannot match both."""
    dirs = simulate_run(tmp_path, audit_pki, rounds=2)
    # site-b countersigns a head the coordinator's (single, presented) log does not contain
    site_b = open_log(audit_pki, dirs["site-b"], "site-b")
    coord_head = verify([dirs["coordinator"]], audit_pki / "ca.crt").logs[0].entries[-1]
    site_b.countersign((coord_head.seq, "e" * 64), subject="coordinator", run="run-1", round=3)
    site_b.close()
    result = verify(list(dirs.values()), audit_pki / "ca.crt")
    assert any(p.file.endswith("coordinator/audit.jsonl") and p.seq == coord_head.seq and "rewritten" in p.message
               for p in result.errors)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=300).filter(lambda b: b"\n" not in b), where=st.integers(0, 12))
def test_any_garbage_line_is_reported_never_raised(tmp_path_factory, honest, audit_pki, junk, where):
    directory = tmp_path_factory.mktemp("junk") / "site-a"
    shutil.copytree(honest["site-a"], directory)
    lines = read_lines(directory)
    write_lines(directory, lines[:where] + [junk] + lines[where + 1:])
    first = first_of(verify([directory], audit_pki / "ca.crt"))
    assert first.seq == where and first.line == where + 1
