"""Offline verification of a federation's audit logs: `verify(dirs, ca_cert)`.

What is checked, in this order (the first failure is the one reported first):

1. Each chain on its own, entry by entry: canonical JSON (nesting and integers bounded, so no
   line can crash the reader), seq = 0, 1, 2 ... without gaps, prev_hash = the previous entry's
   hash, hash = SHA-256 of the content, and the signature under the producer's certificate, which
   must be issued by the federation CA, name the producer as its CN and be valid at the entry's
   time. The chain check stops at the first bad entry of each log: what follows it cannot be
   trusted to be what the producer wrote.
2. The set of logs: at most one coordinator, and logs of the same run(s). A producer may have
   several logs (one per state folder it ran from; their `open` entries name different log ids);
   two copies of one log are refused.
3. The logs against each other (`crosscheck`; only logs whose chain verified to the end take
   part): every message one side logged as sent appears as received at the other side with every
   recorded field equal (digest, bytes, tensor list), and every receipt has its send (unless the
   sender logged it `undelivered`); every countersignature matches the chain it names.
4. Unless `partial=True`: the strict reading (`strict`): every site's log is given, each run is
   sealed and its seal countersigned by the sites, each site's log is closed, and no entry of the
   run lies unpinned and uncorroborated at the end of a log.

`runs` restricts all of it to the entries of those runs (the other logs are left out, with a
warning). A folder that holds `audit/audit.jsonl` (a state folder) is read as its audit folder.

What this can and cannot detect (the limits an auditor should know):
* A producer holds its own key, so it can rewrite its own log entirely. That is caught only where
  another log committed to it: a peer's countersignature of its head, or the peer's record of a
  message. The strict reading refuses a set in which anything of a run is left unpinned; the
  partial reading reports what it could not pin as warnings.
* Certificate revocation is not checked (no CRL is read); validity is checked at each entry's own
  time, which the producer states.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from security.pki import PKIError, identity_from_pem
from security.pki import primitives as pki

from .canonical import parse_timestamp
from .certs import check_cert, cn
from .crosscheck import cross_check, entry_run
from .entry import (FORMAT, GENESIS_PREV_HASH, Entry, entry_hash, entry_signature_ok, parse_line, parse_token,
                    read_json, token_signature_ok)
from .errors import AuditError, Problem
from .reader import RawLog, read_raw
from .strict import strict_problems, unpinned_entries


@dataclass(eq=False)
class LogView:
    """One log as the verifier saw it; `entries` is the prefix that verified."""
    directory: Path
    file: str
    producer: str | None = None
    role: str | None = None
    log_id: str | None = None
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
            run = entry_run(e)
            if run is not None:
                seen.setdefault(run)
        return list(seen)


@dataclass
class VerifyResult:
    logs: list[LogView]
    errors: list[Problem]
    warnings: list[Problem]
    strict: bool = True
    runs: list[str] | None = None          # the run filter, None for all runs

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def first(self) -> Problem | None:
        return self.errors[0] if self.errors else None

    def summary(self) -> str:
        reading = "strict" if self.strict else "partial (unsealed and missing logs are only warnings)"
        head = (f"audit verify: {'OK' if self.ok else 'FAILED'}: {len(self.logs)} log(s), "
                f"{sum(len(v.entries) for v in self.logs)} verified entries, "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s); {reading}"
                + (f"; run(s) {', '.join(self.runs)}" if self.runs else ""))
        lines = [head]
        if self.first:
            lines.append(f"first bad entry: {self.first}")
        lines += [f"  error: {p}" for p in self.errors[1:]]
        lines += [f"  warning: {p}" for p in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "strict": self.strict, "runs": self.runs,
                "first": self.first.to_dict() if self.first else None,
                "errors": [p.to_dict() for p in self.errors], "warnings": [p.to_dict() for p in self.warnings],
                "logs": [{"file": v.file, "producer": v.producer, "role": v.role, "log_id": v.log_id,
                          "entries": len(v.entries), "complete": v.complete, "closed": v.closed, "runs": v.runs(),
                          "certificates": v.certificates} for v in self.logs]}


def verify(dirs: Iterable[str | Path], ca_cert: bytes | str | Path, *, partial: bool = False,
           runs: Iterable[str] | None = None) -> VerifyResult:
    ca_pem = Path(ca_cert).read_bytes() if isinstance(ca_cert, (str, Path)) else bytes(ca_cert)
    try:
        ca = pki.load_cert(ca_pem, what="CA certificate")
        pki.check_is_ca(ca)
    except PKIError as err:
        raise AuditError(f"the CA certificate given cannot be used: {err}") from None
    scope = sorted(set(runs)) if runs else None
    views, errors, warnings = [], [], []
    for directory in dirs:
        try:
            raw = read_raw(directory)
        except (AuditError, OSError) as err:
            errors.append(Problem(str(directory), None, None, str(err)))
            continue
        view, problem = _check_chain(raw, ca)
        if problem:
            errors.append(problem)
        if scope is not None and view.complete and not set(view.runs()) & set(scope):
            warnings.append(Problem(view.file, None, None, f"holds no entry of run(s) {', '.join(scope)}: left out",
                                    "warning"))
            continue
        views.append(view)
    if scope is not None and not views and not errors:
        errors.append(Problem("(the set of logs)", None, None, f"no log given holds an entry of run(s) "
                              f"{', '.join(scope)}"))
        return VerifyResult(views, errors, warnings, strict=not partial, runs=scope)
    errors += _check_set(views, scope)
    cross = cross_check(views, ca, scope, _reporter(views))
    errors += [p for _, p in sorted(cross.found, key=lambda item: item[0])]
    if partial:
        warnings += _partial_warnings(views, cross, scope)
    else:
        strict_errors, strict_warnings = strict_problems(views, cross, scope)
        errors += strict_errors
        warnings += strict_warnings
    for v in views:
        warnings += v.warnings
    return VerifyResult(views, errors, warnings, strict=not partial, runs=scope)


def _reporter(views):
    run_order: dict[str, int] = {}
    for v in views:
        for r in v.runs():
            run_order.setdefault(r, len(run_order))

    def factory(out):
        def report(body: dict, priority: int, problem: Problem) -> None:
            rnd = body.get("round") if isinstance(body.get("round"), int) else -1
            out.found.append(((run_order.get(body.get("run"), -1), rnd, priority, problem.file, problem.seq or 0),
                              problem))
        return report
    return factory


def _partial_warnings(views, cross, scope) -> list[Problem]:
    warnings = [Problem(name, None, None, "countersignatures involving this producer were not cross-checked: its "
                        "log was not given (or did not verify)", "warning") for name in sorted(cross.skipped)]
    runs = set(scope) if scope is not None else {r for v in views for r in v.runs()}
    for v in views:
        if not v.complete:
            continue
        unpinned = [p for p in unpinned_entries([v], cross, runs)[0] if p.severity == "error"]
        if unpinned:
            warnings.append(Problem(v.file, unpinned[0].seq, unpinned[0].line,
                                    f"{len(unpinned)} entr{'y' if len(unpinned) == 1 else 'ies'} from here on lie "
                                    "after the last head a peer committed to, and no peer's log corroborates "
                                    "them: they could be rewritten unseen (a strict reading fails)", "warning"))
    for v in views:
        if v.complete and v.entries and not v.closed:
            last = v.entries[-1]
            warnings.append(Problem(v.file, last.seq, last.seq + 1, "the log ends without a close entry (the "
                                    "process stopped without closing it, or entries after this one were "
                                    "removed; only what peers countersigned or received is pinned)", "warning"))
    return warnings


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
                                    f"found kind {entry.kind!r} of format {entry.body.get('format')!r}")
            view.producer, view.role = entry.producer, entry.body.get("role")
            view.log_id = entry.body.get("log_id")
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
        seq = read_json(line_bytes, "entry").get("seq")
        return seq if isinstance(seq, int) else position
    except (AuditError, AttributeError):
        return position


def _signer(view: LogView, fingerprint, ca, entry: Entry):
    """The public key of the certificate an open/resume entry names, after checking it."""
    if not isinstance(fingerprint, str) or fingerprint not in view.certs:
        here = sorted({cn(pem) for pem in view.certs.values()})
        raise AuditError(f"{entry.producer}'s entry names certificate {str(fingerprint)[:16]}..., which is not in "
                         f"certs/ beside the log (the certificates there are {', '.join(here) or 'none'}'s): "
                         "a log moved from another site's folder, or its certificate removed")
    info = check_cert(view.certs[fingerprint], fingerprint, ca, entry.producer, entry.time)
    view.certificates[fingerprint] = info
    return pki.load_cert(view.certs[fingerprint]).public_key(), identity_from_pem(view.certs[fingerprint])


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
    try:
        good = fp in view.certs and token_signature_ok(pki.load_cert(view.certs[fp]).public_key(), token)
    except PKIError as err:
        return f"the certificate this countersignature names is unreadable: {err}"
    return None if good else "the countersignature in this entry does not verify"


# ---------------------------------------------------------------- 2. the set of logs

def _check_set(views: list[LogView], scope) -> list[Problem]:
    errors, seen = [], {}
    for v in views:
        if v.producer is None:
            continue
        key = (v.producer, v.log_id)
        if key in seen:
            errors.append(Problem(v.file, 0, 1, f"a second copy of the same log of {v.producer!r} (the first is "
                                  f"{seen[key]}; both have log id {v.log_id})"))
        seen.setdefault(key, v.file)
    coordinators = [v for v in views if v.role == "coordinator"]
    for v in coordinators[1:]:
        errors.append(Problem(v.file, 0, 1, f"a second coordinator log (the first is {coordinators[0].file})"))
    reference = coordinators[0] if coordinators else next((v for v in views if v.runs()), None)
    if scope is None and reference is not None and reference.runs():
        for v in views:
            runs = v.runs()
            if v is not reference and runs and not set(runs) & set(reference.runs()):
                first = next(e for e in v.entries if entry_run(e) in runs)
                errors.append(Problem(v.file, first.seq, first.seq + 1,
                                      f"mixed runs: this log is of run(s) {sorted(runs)}, {reference.producer}'s "
                                      f"of {sorted(reference.runs())}; give the logs of one run, or choose with "
                                      "--run"))
    return errors
