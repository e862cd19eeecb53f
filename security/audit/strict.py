"""The strict reading of a federation's logs (the default of `verify`; `partial=True` skips it).

The chain and cross checks catch everything a peer's log committed to. What no peer committed to
is the tail after the last head a peer countersigned, and the logs that were never given. Strict
verification closes both gaps, so that cutting or rewriting a tail fails instead of warning:

1. The set is whole: the coordinator's log is given, and a log of every site the coordinator
   exchanged messages or countersignatures with in a run under verification.
2. Each run is sealed: the coordinator's log has a `seal` entry for it (written when the run
   ended) and every site that took part countersigned that entry; each site's log ends with its
   `close` entry.
3. Nothing is unpinned: every entry of a run that lies after the last head a peer committed to is
   corroborated by a peer's log (a crossing both ends recorded identically, a countersignature
   both ends hold). Only a producer's own refusals may stand alone there (they are warned about).
"""
from __future__ import annotations

from .crosscheck import CrossResult, entry_run
from .errors import Problem

STANDALONE_KINDS = frozenset({"open", "resume", "close", "torn_tail", "seal"})


def strict_problems(views, cross: CrossResult, scope) -> tuple[list[Problem], list[Problem]]:
    logs = [v for v in views if v.producer and v.complete]
    coordinators = [v for v in logs if v.role == "coordinator"]
    if not coordinators:
        return [Problem("(the set of logs)", None, None,
                        "no coordinator log was given: strict verification needs the coordinator's log and "
                        "every site's (give them all, or read these alone with --partial)")], []
    coordinator = coordinators[0]
    runs = sorted(scope) if scope is not None else coordinator.runs()
    errors: list[Problem] = []
    for run in runs:
        errors += _whole_set(coordinator, logs, run)
        errors += _sealed(coordinator, logs, cross, run)
    pin_errors, warnings = unpinned_entries(logs, cross, set(runs))
    return errors + pin_errors, warnings


def _peers_in(coordinator, run: str) -> dict[str, int]:
    """Each site the coordinator dealt with in `run`, and the first entry that shows it."""
    peers: dict[str, int] = {}
    for e in coordinator.entries:
        if entry_run(e) != run:
            continue
        b = e.body
        if e.kind == "boundary":
            peer = b.get("receiver") if b.get("direction") == "send" else b.get("sender")
        elif e.kind == "countersignature":
            peer = b.get("token", {}).get("signer")
        else:
            continue
        if isinstance(peer, str) and peer != coordinator.producer:
            peers.setdefault(peer, e.seq)
    return peers


def _whole_set(coordinator, logs, run: str) -> list[Problem]:
    given = {v.producer for v in logs if run in v.runs()}
    return [Problem(coordinator.file, seq, seq + 1,
                    f"{peer} took part in run {run} (first seen here), but no log of {peer} for that run was "
                    "given: give every site's log, or use --partial to verify without it")
            for peer, seq in sorted(_peers_in(coordinator, run).items()) if peer not in given]


def _sealed(coordinator, logs, cross: CrossResult, run: str) -> list[Problem]:
    seals = [e for e in coordinator.entries if e.kind == "seal" and e.body.get("run") == run]
    if not seals:
        last = coordinator.entries[-1]
        return [Problem(coordinator.file, last.seq, last.seq + 1,
                        f"run {run} is not sealed: the coordinator's log has no seal entry for it (the run has not "
                        "ended, did not end cleanly, or the tail of the log was cut); --partial reads it unsealed")]
    seal = seals[-1]
    signers = {signer for seq, signer in cross.countersigned.get(id(coordinator), ()) if seq == seal.seq}
    errors = []
    sites: dict[str, list] = {}
    for v in logs:
        if v is not coordinator and run in v.runs():
            sites.setdefault(v.producer, []).append(v)
    for site, views in sorted(sites.items()):
        if site not in signers:
            last = views[-1].entries[-1]
            errors.append(Problem(views[-1].file, last.seq, last.seq + 1,
                                  f"{site} never countersigned the coordinator's seal of run {run} "
                                  f"({coordinator.file} seq {seal.seq}): the site left before the run ended, or "
                                  "the tail of its log was cut"))
        for v in views:
            if v.entries[-1].kind != "close":
                last = v.entries[-1]
                errors.append(Problem(v.file, last.seq, last.seq + 1,
                                      "the log ends without a close entry: the site stopped without closing it, "
                                      "or entries after this one were removed"))
    return errors


def unpinned_entries(logs, cross: CrossResult, runs: set) -> tuple[list[Problem], list[Problem]]:
    """Entries of `runs` after the last head a peer pinned that no peer corroborates: (errors,
    warnings for the producers' own refusals)."""
    errors, warnings = [], []
    for v in logs:
        pinned = cross.pinned.get(id(v), -1)
        mine = cross.corroborated.get(id(v), set())
        for e in v.entries[pinned + 1:]:
            if e.kind in STANDALONE_KINDS or entry_run(e) not in runs or e.seq in mine:
                continue
            where = f"after seq {pinned}, the last head a peer committed to" if pinned >= 0 else \
                "and no peer committed to any head of this log"
            problem = Problem(v.file, e.seq, e.seq + 1,
                              f"a {e.kind!r} entry {where}, that no peer's log corroborates: its producer could "
                              "have rewritten or inserted it unseen", "warning" if e.kind == "refusal" else "error")
            (warnings if e.kind == "refusal" else errors).append(problem)
    return errors, warnings
