"""Offline verification of a federation's audit logs: `verify(dirs, ca_cert)`.

What is checked, in this order (the first failure is the one reported first):

1. Each chain on its own, entry by entry: canonical JSON, seq = 0, 1, 2 ... without gaps,
   prev_hash = the previous entry's hash, hash = SHA-256 of the content, and the signature under
   the producer's certificate, which must be issued by the federation CA, name the producer as its
   CN and be valid at the entry's time. The chain check stops at the first bad entry of each log:
   what follows it cannot be trusted to be what the producer wrote.
2. The set of logs: one log per producer, at most one coordinator, and logs of the same run(s).
3. The logs against each other (only logs whose chain verified to the end take part):
   * every message one side logged as sent appears as received at the other side with the same
     SHA-256, and every receipt has its send (unless the sender logged it `undelivered`);
   * every countersignature a participant made matches the coordinator's chain at that seq, and
     every countersignature the coordinator recorded matches the participant's chain.

What this can and cannot detect (the limits an auditor should know):
* A producer holds its own key, so it can rewrite its own log entirely. That is caught only where
  another log committed to it: a peer's countersignature of its head, or the peer's record of a
  message. Entries after the last head a peer countersigned, which no peer recorded, can be cut
  without detection; a log that ends without a `close` entry is reported (as a warning) for that
  reason. Coordinator logs are pinned by the participants' countersignatures each round; a
  participant log is pinned by the own-head inside each countersignature the coordinator keeps,
  and by the uploads the coordinator received from it.
* Logs missing from the set cannot be cross-checked: the result says which checks were skipped.
* Certificate revocation is not checked (no CRL is read); validity is checked at each entry's own
  time, which the producer states.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from security.pki import PKIError, identity_from_pem
from security.pki import primitives as pki

from .canonical import parse_timestamp
from .entry import (FORMAT, GENESIS_PREV_HASH, Entry, entry_hash, entry_signature_ok, parse_line, parse_token,
                    token_signature_ok)
from .errors import AuditError
from .reader import RawLog, read_raw


@dataclass(frozen=True)
class Problem:
    file: str
    seq: int | None
    line: int | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = self.file
        if self.seq is not None:
            where += f" seq {self.seq}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "seq": self.seq, "line": self.line, "message": self.message,
                "severity": self.severity}


@dataclass
class LogView:
    """One log as the verifier saw it; `entries` is the prefix that verified."""
    directory: Path
    file: str
    producer: str | None = None
    role: str | None = None
    entries: list[Entry] = field(default_factory=list)
    certs: dict[str, bytes] = field(default_factory=dict)
    certificates: dict[str, dict] = field(default_factory=dict)   # fingerprint -> who, for the report
    complete: bool = False                                         # every line verified
    warnings: list = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return bool(self.entries) and self.entries[-1].kind == "close"

    def runs(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.entries:
            if isinstance(e.body.get("run"), str):
                seen.setdefault(e.body["run"])
        return list(seen)


@dataclass
class VerifyResult:
    logs: list[LogView]
    errors: list[Problem]
    warnings: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def first(self) -> Problem | None:
        return self.errors[0] if self.errors else None

    def summary(self) -> str:
        head = (f"audit verify: {'OK' if self.ok else 'FAILED'}: {len(self.logs)} log(s), "
                f"{sum(len(v.entries) for v in self.logs)} verified entries, "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        lines = [head]
        if self.first:
            lines.append(f"first bad entry: {self.first}")
        lines += [f"  error: {p}" for p in self.errors[1:]]
        lines += [f"  warning: {p}" for p in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "first": self.first.to_dict() if self.first else None,
                "errors": [p.to_dict() for p in self.errors], "warnings": [p.to_dict() for p in self.warnings],
                "logs": [{"file": v.file, "producer": v.producer, "role": v.role, "entries": len(v.entries),
                          "complete": v.complete, "closed": v.closed, "runs": v.runs(),
                          "certificates": v.certificates} for v in self.logs]}


def verify(dirs: Iterable[str | Path], ca_cert: bytes | str | Path) -> VerifyResult:
    ca_pem = Path(ca_cert).read_bytes() if isinstance(ca_cert, (str, Path)) else bytes(ca_cert)
    try:
        ca = pki.load_cert(ca_pem, what="CA certificate")
        pki.check_is_ca(ca)
    except PKIError as err:
        raise AuditError(f"the CA certificate given cannot be used: {err}") from None
    views, errors, warnings = [], [], []
    for directory in dirs:
        try:
            raw = read_raw(directory)
        except AuditError as err:
            errors.append(Problem(str(directory), None, None, str(err)))
            continue
        view, problem = _check_chain(raw, ca)
        views.append(view)
        if problem:
            errors.append(problem)
    errors += _check_set(views)
    cross_errors, cross_warnings = _cross_check(views, ca)
    errors += cross_errors
    warnings += cross_warnings
    for v in views:
        warnings += v.warnings
        if v.complete and v.entries and not v.closed:
            last = v.entries[-1]
            warnings.append(Problem(v.file, last.seq, last.seq + 1, "the log ends without a close entry (the "
                                    "process stopped without closing it, or entries after this one were "
                                    "removed; only what peers countersigned or received is pinned)", "warning"))
    return VerifyResult(views, errors, warnings)


# ---------------------------------------------------------------- 1. each chain

def _check_chain(raw: RawLog, ca) -> tuple[LogView, Problem | None]:
    view = LogView(raw.directory, str(raw.path), certs=dict(raw.certs))

    def bad(seq, line, message):
        return view, Problem(view.file, seq, line, message)

    if not raw.lines and raw.torn is None:
        return bad(None, None, "empty log: not even the opening entry")
    prev, public, not_after, expiry_warning = GENESIS_PREV_HASH, None, None, None
    for i, line_bytes in enumerate(raw.lines):
        line = i + 1
        try:
            entry = parse_line(line_bytes)
        except AuditError as err:
            return bad(_claimed_seq(line_bytes, i), line, f"unreadable entry: {err}")
        if entry.seq != i:
            return bad(i, line, f"expected seq {i} here, found seq {entry.seq}: an entry was deleted, moved or "
                                "inserted")
        if entry.prev_hash != prev:
            return bad(i, line, f"prev_hash does not match the hash of entry {i - 1}: the chain is broken "
                                "(an entry before this one was removed, reordered or altered)")
        if entry_hash(entry.core()) != entry.hash:
            return bad(i, line, "hash does not match the entry's content: the entry was altered")
        if i == 0:
            if entry.kind != "open" or entry.body.get("format") != FORMAT:
                return bad(i, line, f"the first entry must be an 'open' entry of format {FORMAT!r}, "
                                    f"found kind {entry.kind!r}")
            view.producer, view.role = entry.producer, entry.body.get("role")
        elif entry.producer != view.producer:
            return bad(i, line, f"producer {entry.producer!r}, but this log belongs to {view.producer!r}")
        if i > 0 and view.entries[-1].kind == "close" and entry.kind not in ("resume",):
            return bad(i, line, f"a {entry.kind!r} entry follows a close entry without a resume entry")
        if entry.kind in ("open", "resume"):
            try:
                public, identity = _signer(view, entry.body.get("certificate"), ca, entry)
            except AuditError as err:
                return bad(i, line, str(err))
            not_after = pki.load_cert(view.certs[entry.body["certificate"]]).not_valid_after_utc
            if i == 0 and entry.body.get("role") != identity.role:
                return bad(i, line, f"the log claims role {entry.body.get('role')!r}, its certificate says "
                                    f"{identity.role!r}")
        try:
            at = parse_timestamp(entry.time)
        except AuditError as err:
            return bad(i, line, str(err))
        if expiry_warning is None and at > not_after:
            expiry_warning = Problem(view.file, i, line, f"signed at {entry.time}, after {view.producer}'s "
                                     f"certificate expired ({not_after.isoformat()}); later entries too", "warning")
        if not entry_signature_ok(public, entry):
            return bad(i, line, f"signature does not verify with {view.producer}'s certificate: the entry was "
                                "not written by its producer (forged or inserted)")
        if entry.kind == "countersign":
            problem = _countersign_entry_problem(entry, view)
            if problem:
                return bad(i, line, problem)
        view.entries.append(entry)
        prev = entry.hash
    if raw.torn is not None:
        n = len(raw.lines)
        return bad(n, n + 1, f"torn final line ({len(raw.torn)} bytes without a newline): the producer stopped "
                             "in the middle of an append, or the file was cut")
    view.complete = True
    view.warnings = [expiry_warning] if expiry_warning else []
    return view, None


def _claimed_seq(line_bytes: bytes, position: int) -> int:
    try:
        seq = json.loads(line_bytes.decode("utf-8", "replace")).get("seq")
        return seq if isinstance(seq, int) else position
    except (ValueError, AttributeError):
        return position


def _signer(view: LogView, fingerprint, ca, entry: Entry):
    """The public key of the certificate an open/resume entry names, after checking it."""
    if not isinstance(fingerprint, str) or fingerprint not in view.certs:
        here = sorted({_cn(pem) for pem in view.certs.values()})
        raise AuditError(f"{entry.producer}'s entry names certificate {str(fingerprint)[:16]}..., which is not in "
                         f"certs/ beside the log (the certificates there are {', '.join(here) or 'none'}'s): "
                         "a log moved from another site's folder, or its certificate removed")
    info = _check_cert(view.certs[fingerprint], fingerprint, ca, entry.producer, entry.time)
    view.certificates[fingerprint] = info
    return pki.load_cert(view.certs[fingerprint]).public_key(), identity_from_pem(view.certs[fingerprint])


def _cn(pem: bytes) -> str:
    try:
        return identity_from_pem(pem).name
    except PKIError:
        return "unreadable"


def _check_cert(pem: bytes, fingerprint: str, ca, name: str, at_time: str) -> dict:
    try:
        cert = pki.load_cert(pem)
        if pki.fingerprint(cert) != fingerprint:
            raise AuditError(f"certs/{fingerprint[:16]}...pem holds a different certificate")
        pki.check_issued_by(cert, ca)
        pki.check_validity(cert, now=parse_timestamp(at_time))
        identity = identity_from_pem(pem)
    except PKIError as err:
        raise AuditError(f"signed by a certificate the federation CA does not vouch for: {err}") from None
    if identity.name != name:
        raise AuditError(f"the certificate names {identity.name!r}, but the entries say they come from {name!r} "
                         "(a log moved to another site's folder, or a certificate swapped)")
    return {"name": identity.name, "role": identity.role, "serial": f"{identity.serial:x}",
            "fingerprint": fingerprint, "issuer": identity.issuer,
            "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat()}


def _countersign_entry_problem(entry: Entry, view: LogView) -> str | None:
    try:
        token = parse_token(entry.body)
    except AuditError as err:
        return f"countersign entry: {err}"
    prev = view.entries[-1]
    if token["signer"] != view.producer:
        return f"countersign entry signed as {token['signer']!r} in {view.producer}'s log"
    if token["signer_head"] != {"seq": prev.seq, "hash": prev.hash}:
        return "countersign entry does not name the head right before it"
    fp = token["signer_certificate"]
    if fp not in view.certs or not token_signature_ok(pki.load_cert(view.certs[fp]).public_key(), token):
        return "the countersignature in this entry does not verify"
    return None


# ---------------------------------------------------------------- 2. the set of logs

def _check_set(views: list[LogView]) -> list[Problem]:
    errors, seen = [], {}
    for v in views:
        if v.producer is None:
            continue
        if v.producer in seen:
            errors.append(Problem(v.file, 0, 1, f"a second log of {v.producer!r} (the first is {seen[v.producer]})"))
        seen.setdefault(v.producer, v.file)
    coordinators = [v for v in views if v.role == "coordinator"]
    for v in coordinators[1:]:
        errors.append(Problem(v.file, 0, 1, f"a second coordinator log (the first is {coordinators[0].file})"))
    reference = coordinators[0] if coordinators else next((v for v in views if v.runs()), None)
    if reference is not None and reference.runs():
        for v in views:
            runs = v.runs()
            if v is not reference and runs and not set(runs) & set(reference.runs()):
                first = next(e for e in v.entries if e.body.get("run") in runs)
                errors.append(Problem(v.file, first.seq, first.seq + 1,
                                      f"mixed runs: this log is of run(s) {sorted(runs)}, {reference.producer}'s "
                                      f"of {sorted(reference.runs())}; give the logs of one run"))
    return errors


# ---------------------------------------------------------------- 3. logs against each other

def _cross_check(views: list[LogView], ca) -> tuple[list[Problem], list[Problem]]:
    logs = {v.producer: v for v in views if v.producer and v.complete}
    run_order: dict[str, int] = {}
    for v in views:
        for r in v.runs():
            run_order.setdefault(r, len(run_order))
    found: list[tuple[tuple, Problem]] = []
    warnings: list[Problem] = []

    def report(body: dict, priority: int, problem: Problem) -> None:
        rnd = body.get("round") if isinstance(body.get("round"), int) else -1
        found.append(((run_order.get(body.get("run"), -1), rnd, priority, problem.file, problem.seq or 0), problem))

    _match_boundaries(logs, report)
    skipped = set()
    # indexes, so the checks below stay linear in the number of entries
    recorded = {v.producer: {e.body.get("token", {}).get("signature") for e in v.entries
                             if e.kind == "countersignature"} for v in logs.values()}
    undelivered = {v.producer: {e.body.get("ref_seq") for e in v.entries if e.kind == "undelivered"}
                   for v in logs.values()}
    for v in logs.values():
        for e in v.entries:
            if e.kind == "countersign":
                _check_countersign(v, e, logs, report, skipped, recorded, undelivered)
            elif e.kind == "countersignature":
                _check_countersignature(v, e, logs, ca, report, skipped)
    for name in sorted(skipped):
        warnings.append(Problem(name, None, None, "countersignatures involving this producer were not "
                                "cross-checked: its log was not given (or did not verify)", "warning"))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found], warnings


def _match_boundaries(logs: dict[str, LogView], report) -> None:
    sends, receipts = defaultdict(list), defaultdict(list)
    for v in logs.values():
        undelivered = {e.body.get("ref_seq") for e in v.entries if e.kind == "undelivered"}
        for e in v.entries:
            b = e.body
            if e.kind != "boundary":
                continue
            key = (b.get("sender"), b.get("receiver"), b.get("run"), b.get("round"), b.get("message"))
            if b.get("direction") == "send":
                sends[key].append((v, e, e.seq in undelivered))
            elif b.get("direction") == "receive":
                receipts[key].append((v, e))
    for key in sorted(set(sends) | set(receipts), key=repr):
        sender, receiver, run, rnd, message = key
        if sender not in logs or receiver not in logs:
            continue
        if run not in logs[sender].runs() or run not in logs[receiver].runs():
            continue
        what = f"{message} of run {run} round {rnd}"
        # mandatory sends first, so an undelivered send never takes the receipt of a delivered one
        pending = sorted(sends.get(key, []), key=lambda s: s[2])
        left = list(receipts.get(key, []))
        unmatched = []
        for v, e, optional in pending:
            hit = next((r for r in left if r[1].body.get("sha256") == e.body.get("sha256")), None)
            if hit:
                left.remove(hit)
            elif not optional:
                unmatched.append((v, e))
        for (sv, se), (rv, re_) in zip(unmatched, left):
            report(re_.body, 0, Problem(rv.file, re_.seq, re_.seq + 1,
                   f"received {what} from {sender} with sha256 {re_.body.get('sha256', '')[:16]}..., but "
                   f"{sender} logged sending sha256 {se.body.get('sha256', '')[:16]}... ({sv.file} seq {se.seq})"))
        for sv, se in unmatched[len(left):]:
            report(se.body, 0, Problem(sv.file, se.seq, se.seq + 1,
                   f"{sender} logged sending {what} (sha256 {se.body.get('sha256', '')[:16]}...) to {receiver}, "
                   f"but {receiver}'s log has no receipt of it"))
        for rv, re_ in left[len(unmatched):]:
            report(re_.body, 0, Problem(rv.file, re_.seq, re_.seq + 1,
                   f"{receiver} logged receiving {what} (sha256 {re_.body.get('sha256', '')[:16]}...) from "
                   f"{sender}, but {sender}'s log has no such send"))


def _check_countersign(v: LogView, e: Entry, logs, report, skipped, recorded, undelivered) -> None:
    """A participant's countersignature against the subject's (coordinator's) chain."""
    token = e.body
    subject = token["subject"]
    target = logs.get(subject)
    if target is None:
        skipped.add(subject)
        return
    seq, claimed = token["subject_head"]["seq"], token["subject_head"]["hash"]
    evidence = f"{v.producer} countersigned it in round {token['round']} ({v.file} seq {e.seq})"
    if seq >= len(target.entries):
        last = len(target.entries) - 1
        # a cut log explains the missing receipts of the same round: report the cut first
        report(token, -1, Problem(target.file, last + 1, None,
               f"missing: {subject}'s log ends at seq {last}, but {evidence} as seq {seq}: entries were removed "
               f"from the end of {subject}'s log"))
        return
    if seq >= 0 and target.entries[seq].hash != claimed:
        report(token, 1, Problem(target.file, seq, seq + 1,
               f"this entry's hash differs from the one {evidence}: {subject}'s history up to here was rewritten"))
        return
    if token["signature"] not in recorded[subject] and e.seq not in undelivered[v.producer]:
        report(token, 2, Problem(v.file, e.seq, e.seq + 1,
               f"{subject}'s log has no record of this countersignature (round {token['round']})"))


def _check_countersignature(v: LogView, e: Entry, logs, ca, report, skipped) -> None:
    """A countersignature the coordinator recorded: of its own chain, by a genuine peer, matching the
    peer's own chain."""
    try:
        token = parse_token(e.body.get("token"))
    except AuditError as err:
        report(e.body, 1, Problem(v.file, e.seq, e.seq + 1, f"recorded countersignature: {err}"))
        return
    seq, claimed = token["subject_head"]["seq"], token["subject_head"]["hash"]
    if token["subject"] != v.producer or not 0 <= seq < e.seq or v.entries[seq].hash != claimed:
        report(token, 1, Problem(v.file, e.seq, e.seq + 1,
               f"records {token['signer']}'s countersignature of a head this log does not have (seq {seq})"))
        return
    signer, fp = token["signer"], token["signer_certificate"]
    peer = logs.get(signer)
    pem = v.certs.get(fp) or (peer.certs.get(fp) if peer else None)
    if pem is None:
        skipped.add(signer)
    else:
        try:
            _check_cert(pem, fp, ca, signer, token["time"])
            if not token_signature_ok(pki.load_cert(pem).public_key(), token):
                raise AuditError(f"{signer}'s countersignature does not verify")
        except AuditError as err:
            report(token, 1, Problem(v.file, e.seq, e.seq + 1, f"recorded countersignature: {err}"))
            return
    if peer is None:
        skipped.add(signer)
        return
    own_seq, own_hash = token["signer_head"]["seq"], token["signer_head"]["hash"]
    evidence = f"{v.producer} holds {signer}'s countersignature naming it ({v.file} seq {e.seq})"
    if own_seq + 1 >= len(peer.entries):
        last = len(peer.entries) - 1
        report(token, -1, Problem(peer.file, last + 1, None,
               f"missing: {signer}'s log ends at seq {last}, but {evidence} with {signer}'s seq {own_seq}: "
               f"entries were removed from the end of {signer}'s log"))
    elif (peer.entries[own_seq].hash != own_hash
          or peer.entries[own_seq + 1].body.get("signature") != token["signature"]):
        report(token, 1, Problem(peer.file, own_seq, own_seq + 1,
               f"this entry differs from the head {evidence}: {signer}'s history was rewritten"))
