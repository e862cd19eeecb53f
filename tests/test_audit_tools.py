"""The auditor's tools on the logs a real deployment leaves: one coordinator log across runs, a site
that ran from several state folders, state folders given instead of audit folders, a run filter,
hostile lines that must be reported (never a traceback), and the report's tensor groups and
budget declines."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ktfed.audit_report import collect, tensor_groups
from security.audit import verify
from tests.test_audit_log import make_audit_pki, open_log, read_lines, simulate_run, write_lines


@pytest.fixture(scope="module")
def audit_pki(tmp_path_factory):
    return make_audit_pki(tmp_path_factory.mktemp("audit-tools-pki") / "pki")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, audit_pki):
    """One coordinator state folder for run-1 then run-2; site-a ran each from its own state folder."""
    root = tmp_path_factory.mktemp("two-runs")
    coord = root / "coordinator" / "audit"
    first = simulate_run(root / "r1", audit_pki, rounds=2, run="run-1",
                         folders={"coordinator": coord, "site-a": root / "site-a-1" / "audit",
                                  "site-b": root / "site-b" / "audit"})
    second = simulate_run(root / "r2", audit_pki, rounds=3, run="run-2",
                          folders={"coordinator": coord, "site-a": root / "site-a-2" / "audit",
                                   "site-b": root / "site-b" / "audit"})
    return root, first, second


def test_several_state_folders_of_one_site_are_told_apart(two_runs, audit_pki):
    root, _, _ = two_runs
    dirs = [root / "coordinator", root / "site-a-1", root / "site-a-2", root / "site-b"]   # state folders
    result = verify(dirs, audit_pki / "ca.crt")
    assert result.ok and not result.warnings, result.summary()
    assert sorted(v.producer for v in result.logs) == ["coordinator", "site-a", "site-a", "site-b"]
    assert len({v.log_id for v in result.logs}) == 4


def test_a_run_filter_checks_only_that_run(two_runs, audit_pki):
    root, _, _ = two_runs
    dirs = [root / "coordinator", root / "site-a-1", root / "site-a-2", root / "site-b"]
    # without site-a's second folder, run-2 cannot be verified strictly, run-1 can
    partial_set = [d for d in dirs if d.name != "site-a-2"]
    assert "site-a took part in run run-2" in verify(partial_set, audit_pki / "ca.crt").first.message
    result = verify(partial_set, audit_pki / "ca.crt", runs=["run-1"])
    assert result.ok, result.summary()
    assert result.runs == ["run-1"]
    only = verify(dirs, audit_pki / "ca.crt", runs=["run-2"])
    assert only.ok and any("site-a-1" in w.file and "left out" in w.message for w in only.warnings)
    data = collect(only)
    assert data["manifest"]["runs"] == ["run-2"]
    assert {r["run"] for rows in data["privacy"].values() for r in rows} == {"run-2"}


def test_a_rewritten_second_instance_is_still_caught(two_runs, audit_pki, tmp_path):
    root, _, _ = two_runs
    copy = tmp_path / "site-a-2"
    shutil.copytree(root / "site-a-2", copy)
    lines = read_lines(copy / "audit")
    write_lines(copy / "audit", lines[:-4])          # cut the tail of the run-2 folder
    result = verify([root / "coordinator", root / "site-a-1", copy, root / "site-b"], audit_pki / "ca.crt")
    assert not result.ok
    assert any("removed from the end of site-a's log" in p.message and "site-a-2" in p.file for p in result.errors)


def test_the_cli_takes_state_folders_and_a_run_filter(two_runs, audit_pki):
    root, _, _ = two_runs
    args = [root / "coordinator", root / "site-a-1", root / "site-b"]
    done = _ktfed("audit", "verify", *args, "--pki", audit_pki, "--run", "run-1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "run(s) run-1" in done.stdout
    done = _ktfed("audit", "verify", *args, "--pki", audit_pki, "--partial")
    assert done.returncode == 0 and "partial" in done.stdout, done.stdout + done.stderr


def _ktfed(*args):
    return subprocess.run([sys.executable, "-m", "ktfed", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("hostile", [b"[" * 200_000 + b"]" * 200_000, b'{"seq":' + b"7" * 5000 + b"}",
                                     b'{"a":' * 3000 + b"1" + b"}" * 3000])
def test_a_hostile_line_is_reported_naming_file_and_line(tmp_path, audit_pki, hostile):
    dirs = simulate_run(tmp_path, audit_pki, rounds=1)
    lines = read_lines(dirs["site-a"])
    write_lines(dirs["site-a"], lines[:3] + [hostile] + lines[4:])
    done = _ktfed("audit", "verify", *dirs.values(), "--pki", audit_pki)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert f"first bad entry: {dirs['site-a'] / 'audit.jsonl'} seq 3 (line 4): unreadable entry" in done.stdout
    assert "levels deep" in done.stdout or "digits" in done.stdout


def test_tensor_names_are_grouped():
    tensors = {f"layers.{i}.{w}": {"shape": [8, 8], "dtype": "float32"} for i in range(40) for w in ("w_a", "w_b")}
    tensors["head.r"] = {"shape": [8], "dtype": "float32"}
    groups = tensor_groups(tensors)
    assert [(g["pattern"], len(g["names"])) for g in groups] == [("head.r", 1), ("layers.*.w_a", 40),
                                                                 ("layers.*.w_b", 40)]


def test_the_report_groups_tensors_and_lists_budget_declines(tmp_path, audit_pki):
    from ktfed.audit_report import write_report

    dirs = simulate_run(tmp_path / "logs", audit_pki, rounds=2)
    coord, site = open_log(audit_pki, dirs["coordinator"], "coordinator"), open_log(audit_pki, dirs["site-a"], "site-a")
    digest = "ab" * 32
    site.log_refusal(run="run-1", round=3, peer="coordinator", message="task", reason="budget_exhausted",
                     detail="epsilon 3.9 + 0.4 would exceed the budget 4")
    common = dict(run="run-1", round=3, sender="site-a", receiver="coordinator", message="decline", sha256=digest)
    site.log_boundary(direction="send", **common)
    coord.log_boundary(direction="receive", **common)
    for log in (coord, site):
        log.close("end")
    result = verify(list(dirs.values()), audit_pki / "ca.crt", partial=True)
    paths = write_report(result, tmp_path / "report")
    page = paths["html"].read_text()
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["declines"] == [{"site": "site-a", "run": "run-1", "round": 3,
                                 "reason": "epsilon 3.9 + 0.4 would exceed the budget 4"}]
    assert "Rounds a site declined" in page and "would exceed the budget 4" in page
    assert "2 tensor(s) in 2 group(s)" in page and "<details>" in page


@pytest.fixture(scope="module")
def sealed(tmp_path_factory, audit_pki):
    return simulate_run(tmp_path_factory.mktemp("sealed"), audit_pki, rounds=2)


MUTATIONS = ("delete", "duplicate", "swap", "junk", "flip", "truncate")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(producer=st.sampled_from(["coordinator", "site-a", "site-b"]), how=st.sampled_from(MUTATIONS),
       where=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=80).filter(lambda b: b"\n" not in b))
def test_every_change_to_a_sealed_set_fails_strictly_and_nothing_raises(tmp_path_factory, sealed, audit_pki,
                                                                        producer, how, where, junk):
    root = tmp_path_factory.mktemp("mutated")
    dirs = {name: root / name for name in sealed}
    for name, src in sealed.items():
        shutil.copytree(src, dirs[name])
    lines = read_lines(dirs[producer])
    i = where % len(lines)
    if how == "delete":
        changed = lines[:i] + lines[i + 1:]
    elif how == "duplicate":
        changed = lines[:i + 1] + lines[i:]
    elif how == "swap":
        j = (i + 1) % len(lines)
        changed = list(lines)
        changed[i], changed[j] = changed[j], changed[i]
    elif how == "junk":
        changed = lines[:i] + [junk] + lines[i + 1:]
    elif how == "flip":
        line = bytearray(lines[i])
        line[where % len(line)] ^= 1 << (where % 7)
        changed = lines[:i] + [bytes(line)] + lines[i + 1:]
    else:
        data = b"".join(line + b"\n" for line in lines)
        (dirs[producer] / "audit.jsonl").write_bytes(data[:where % len(data)])
        changed = None
    if changed is not None:
        write_lines(dirs[producer], changed)
    strict = verify(list(dirs.values()), audit_pki / "ca.crt")
    verify(list(dirs.values()), audit_pki / "ca.crt", partial=True)
    # the coordinator's close carries no claim: the one change a strict reading cannot see
    harmless = producer == "coordinator" and (
        (how == "delete" and i == len(lines) - 1)
        or (how == "truncate" and (where % len(b"".join(line + b"\n" for line in lines)))
            == sum(len(line) + 1 for line in lines[:-1])))
    assert strict.ok == harmless, (producer, how, i, strict.summary())


def test_the_coordinators_trail_seals_a_run_and_refuses_rounds_the_log_cannot_hold(tmp_path, audit_pki):
    from coordinator.audit_trail import AuditTrail
    from coordinator.errors import Refusal
    from tests.test_audit_log import cert_of

    trail = AuditTrail(open_log(audit_pki, tmp_path / "coordinator", "coordinator"), "coordinator")
    site = open_log(audit_pki, tmp_path / "site-a", "site-a")
    trail.config("run-1", {"rounds": 1})
    with pytest.raises(Refusal, match="header.round 9007199254740992 is outside"):
        trail.sent("run-1", 2**53, "site-a", "state", "ab" * 32)
    with pytest.raises(Refusal, match="outside"):
        trail.received("run-1", -1, "site-a", "update", "ab" * 32)
    site.log_config(run="run-1", config={"rounds": 1})
    head = trail.seal("run-1", 1, "finished")
    token = site.countersign(head, subject="coordinator", run="run-1", round=1)
    trail.seal_countersigned("site-a", token, cert_of(audit_pki, "site-a"))
    for log in (trail, site):
        log.close("end")
    result = verify([tmp_path / "coordinator", tmp_path / "site-a"], audit_pki / "ca.crt")
    assert result.ok, result.summary()
    coordinator = next(v for v in result.logs if v.producer == "coordinator")
    assert [e.kind for e in coordinator.entries[-3:]] == ["seal", "countersignature", "close"]


def test_a_run_that_no_log_holds_is_named(two_runs, audit_pki):
    root, _, _ = two_runs
    result = verify([root / "coordinator", root / "site-b"], audit_pki / "ca.crt", runs=["run-9"])
    assert not result.ok and result.first.message == "no log given holds an entry of run(s) run-9"


def test_the_partial_reading_says_how_much_is_unpinned(tmp_path, audit_pki):
    dirs = simulate_run(tmp_path, audit_pki, rounds=2, close=False)
    result = verify(list(dirs.values()), audit_pki / "ca.crt", partial=True)
    assert result.ok
    assert any(w.file.endswith("coordinator/audit.jsonl") and "lie after the last head a peer committed to"
               in w.message for w in result.warnings), result.summary()
