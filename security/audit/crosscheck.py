"""The logs against each other: sends against receipts, countersignatures against chains.

Only logs whose chain verified to the end take part. A producer may have several logs (one per
state folder it ran from, told apart by the `log_id` of their `open` entries); a peer's record is
checked against the log of that producer that holds the run it names, so logs of other runs or
instances never count as a rewritten history.

Besides the problems, the check returns what the strict reading needs (see `strict`): which
entries another log corroborates, and how far each log is pinned by a head a peer committed to.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from security.pki import primitives as pki

from .certs import check_cert
from .entry import Entry, parse_token, token_signature_ok
from .errors import AuditError, Problem

# fields both ends of a crossing record; the rest of a boundary body must be equal at both ends
_SIDE_FIELDS = ("direction",)


@dataclass
class CrossResult:
    found: list = field(default_factory=list)                 # (sort key, Problem)
    skipped: set = field(default_factory=set)                 # producers whose log was not given
    corroborated: dict = field(default_factory=lambda: defaultdict(set))   # id(view) -> seqs
    pinned: dict = field(default_factory=dict)                # id(view) -> highest seq a peer pinned
    countersigned: dict = field(default_factory=lambda: defaultdict(set))  # id(view) -> {(seq, signer)}

    def pin(self, view, seq: int) -> None:
        self.pinned[id(view)] = max(self.pinned.get(id(view), -1), seq)


def entry_run(e: Entry):
    run = e.body.get("run")
    if run is None and isinstance(e.body.get("token"), dict):
        run = e.body["token"].get("run")
    return run if isinstance(run, str) else None


def cross_check(views, ca, scope, report_factory) -> CrossResult:
    """`scope`: the runs under verification (None: all). `report_factory(result)` returns the
    `report(body, priority, problem)` callback that orders problems by run and round."""
    instances: dict[str, list] = defaultdict(list)
    for v in views:
        if v.producer and v.complete:
            instances[v.producer].append(v)
    out = CrossResult()
    report = report_factory(out)

    def in_scope(e: Entry) -> bool:
        return scope is None or entry_run(e) in scope

    _match_boundaries(instances, report, out, in_scope)
    recorded = {name: {e.body.get("token", {}).get("signature") for v in vs for e in v.entries
                       if e.kind == "countersignature"} for name, vs in instances.items()}
    undelivered = {id(v): {e.body.get("ref_seq") for e in v.entries if e.kind == "undelivered"}
                   for vs in instances.values() for v in vs}
    for vs in instances.values():
        for v in vs:
            for e in v.entries:
                if not in_scope(e):
                    continue
                if e.kind == "countersign":
                    _check_countersign(v, e, instances, report, out, recorded, undelivered)
                elif e.kind == "countersignature":
                    _check_countersignature(v, e, instances, ca, report, out)
    return out


def _runs_of(views) -> set:
    return {r for v in views for r in v.runs()}


def _comparable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in _SIDE_FIELDS}


def _differences(sent: dict, got: dict) -> tuple[str, str]:
    """What differs between a send and a receipt, as (the receipt's side, the sender's side)."""
    mine, theirs = [], []
    for key in sorted(set(_comparable(sent)) | set(_comparable(got))):
        a, b = sent.get(key), got.get(key)
        if a == b:
            continue
        if key == "tensors" and isinstance(a, list) and isinstance(b, list):
            names_a = {t.get("name"): t for t in a if isinstance(t, dict)}
            names_b = {t.get("name"): t for t in b if isinstance(t, dict)}
            diff = sorted(n for n in set(names_a) | set(names_b) if names_a.get(n) != names_b.get(n))
            mine.append(f"tensors differing in {', '.join(map(str, diff[:3])) or 'order'}")
            theirs.append(f"{len(a)} tensor(s)")
        elif key == "sha256":
            mine.append(f"sha256 {str(b)[:16]}...")
            theirs.append(f"sha256 {str(a)[:16]}...")
        else:
            mine.append(f"{key} {b!r}")
            theirs.append(f"{key} {a!r}")
    return ", ".join(mine), ", ".join(theirs)


def _match_boundaries(instances, report, out: CrossResult, in_scope) -> None:
    sends, receipts = defaultdict(list), defaultdict(list)
    for vs in instances.values():
        for v in vs:
            undelivered = {e.body.get("ref_seq") for e in v.entries if e.kind == "undelivered"}
            for e in v.entries:
                b = e.body
                if e.kind != "boundary" or not in_scope(e):
                    continue
                key = (b.get("sender"), b.get("receiver"), b.get("run"), b.get("round"), b.get("message"))
                if b.get("direction") == "send":
                    sends[key].append((v, e, e.seq in undelivered))
                elif b.get("direction") == "receive":
                    receipts[key].append((v, e))
    for key in sorted(set(sends) | set(receipts), key=repr):
        sender, receiver, run, rnd, message = key
        if sender not in instances or receiver not in instances:
            continue
        if run not in _runs_of(instances[sender]) or run not in _runs_of(instances[receiver]):
            continue
        _match_one(key, sends.get(key, []), list(receipts.get(key, [])), report, out)


def _match_one(key, sent, left, report, out: CrossResult) -> None:
    sender, receiver, run, rnd, message = key
    what = f"{message} of run {run} round {rnd}"
    # mandatory sends first, so an undelivered send never takes the receipt of a delivered one
    pending = sorted(sent, key=lambda s: s[2])
    unmatched = []
    for v, e, optional in pending:
        want = _comparable(e.body)
        hit = next((r for r in left if _comparable(r[1].body) == want), None)
        if hit:
            left.remove(hit)
            out.corroborated[id(v)].add(e.seq)
            out.corroborated[id(hit[0])].add(hit[1].seq)
        elif not optional:
            unmatched.append((v, e))
    # pair what is left by digest first, so a changed byte count is named on the right receipt
    for (sv, se) in list(unmatched):
        twin = next((r for r in left if r[1].body.get("sha256") == se.body.get("sha256")), None) \
            or (left[0] if left else None)
        if twin is None:
            break
        unmatched.remove((sv, se))
        left.remove(twin)
        rv, re_ = twin
        got, was = _differences(se.body, re_.body)
        report(re_.body, 0, _problem(rv, re_, f"received {what} from {sender} with {got}, but {sender} logged "
                                     f"sending {was} ({sv.file} seq {se.seq})"))
    for sv, se in unmatched:
        report(se.body, 0, _problem(sv, se, f"{sender} logged sending {what} (sha256 "
                                    f"{se.body.get('sha256', '')[:16]}...) to {receiver}, but {receiver}'s log "
                                    "has no receipt of it"))
    for rv, re_ in left:
        report(re_.body, 0, _problem(rv, re_, f"{receiver} logged receiving {what} (sha256 "
                                     f"{re_.body.get('sha256', '')[:16]}...) from {sender}, but {sender}'s log "
                                     "has no such send"))


def _problem(view, e: Entry, message: str) -> Problem:
    return Problem(view.file, e.seq, e.seq + 1, message)


def _candidates(instances, name: str, run) -> list:
    """The given logs of `name` that hold entries of `run`."""
    return [v for v in instances.get(name, []) if run in v.runs()]


def _check_countersign(v, e: Entry, instances, report, out: CrossResult, recorded, undelivered) -> None:
    """A participant's countersignature against the subject's (coordinator's) chain."""
    token = e.body
    subject = token["subject"]
    targets = _candidates(instances, subject, token["run"]) or instances.get(subject, [])
    if not targets:
        out.skipped.add(subject)
        return
    seq, claimed = token["subject_head"]["seq"], token["subject_head"]["hash"]
    target = next((t for t in targets if 0 <= seq < len(t.entries) and t.entries[seq].hash == claimed), None)
    evidence = f"{v.producer} countersigned it in round {token['round']} ({v.file} seq {e.seq})"
    if target is None:
        target = targets[0]
        if seq >= len(target.entries):
            last = len(target.entries) - 1
            # a cut log explains the missing receipts of the same round: report the cut first
            report(token, -1, Problem(target.file, last + 1, None,
                   f"missing: {subject}'s log ends at seq {last}, but {evidence} as seq {seq}: entries were "
                   f"removed from the end of {subject}'s log"))
        elif seq >= 0:
            report(token, 1, Problem(target.file, seq, seq + 1,
                   f"this entry's hash differs from the one {evidence}: {subject}'s history up to here was "
                   "rewritten"))
        return
    out.pin(target, seq)
    out.countersigned[id(target)].add((seq, v.producer))
    if token["signature"] in recorded[subject]:
        out.corroborated[id(v)].add(e.seq)
    elif e.seq not in undelivered[id(v)]:
        report(token, 2, Problem(v.file, e.seq, e.seq + 1,
               f"{subject}'s log has no record of this countersignature (round {token['round']})"))


def _check_countersignature(v, e: Entry, instances, ca, report, out: CrossResult) -> None:
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
    peers = _candidates(instances, signer, token["run"])
    pem = v.certs.get(fp) or next((p.certs[fp] for p in peers if fp in p.certs), None)
    if pem is None:
        out.skipped.add(signer)
    else:
        try:
            check_cert(pem, fp, ca, signer, token["time"])
            if not token_signature_ok(pki.load_cert(pem).public_key(), token):
                raise AuditError(f"{signer}'s countersignature does not verify")
        except AuditError as err:
            report(token, 1, Problem(v.file, e.seq, e.seq + 1, f"recorded countersignature: {err}"))
            return
    if not peers:
        out.skipped.add(signer)
        return
    own_seq, own_hash = token["signer_head"]["seq"], token["signer_head"]["hash"]

    def holds(p) -> bool:
        return (own_seq + 1 < len(p.entries) and p.entries[own_seq].hash == own_hash
                and p.entries[own_seq + 1].body.get("signature") == token["signature"])

    peer = next((p for p in peers if holds(p)), None)
    if peer is not None:
        out.pin(peer, own_seq + 1)
        out.corroborated[id(v)].add(e.seq)
        return
    peer = peers[-1]
    evidence = f"{v.producer} holds {signer}'s countersignature naming it ({v.file} seq {e.seq})"
    if own_seq + 1 >= len(peer.entries):
        last = len(peer.entries) - 1
        report(token, -1, Problem(peer.file, last + 1, None,
               f"missing: {signer}'s log ends at seq {last}, but {evidence} with {signer}'s seq {own_seq}: "
               f"entries were removed from the end of {signer}'s log"))
    else:
        report(token, 1, Problem(peer.file, own_seq, own_seq + 1,
               f"this entry differs from the head {evidence}: {signer}'s history was rewritten"))
