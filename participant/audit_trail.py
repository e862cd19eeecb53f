"""The site's audit trail: what crossed its boundary with the coordinator, which DP parameters it
spent, what it refused, in the site's own hash-chained, signed log (security.audit).

`SiteAudit` keeps the log (STATE/audit) and reopens it when the site's certificate is rotated, so
every entry is signed with the key the coordinator sees the site use; `NoAudit` is the same
interface doing nothing (with --insecure there is no key to sign with, and `--no-audit` measures
the cost). Callers never check which one they hold.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from kt_core.wire import transport
from kt_core.wire import federation_pb2 as pb
from security.audit import AuditLog

log = logging.getLogger(__name__)


def certificate_stamp(tls: transport.TLSFiles | None):
    """(inode, mtime) of the certificate files: a rotation replaces them by rename."""
    if tls is None:
        return None
    out = []
    for path in (tls.ca_cert, tls.cert, tls.key):
        try:
            st = Path(path).stat()
            out.append((st.st_ino, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class NoAudit:
    """No audit log: every record is dropped, no countersignature is given."""

    def rotate_if_needed(self) -> None:
        pass

    def config(self, run: str, config: dict, policy=None) -> None:
        pass

    def boundary(self, run: str, direction: str, round_no: int, message: str, sha256: str, specs=(),
                 nbytes: int | None = None) -> int | None:
        return None

    def countersign(self, run: str, assignment: pb.RoundAssignment) -> tuple[bytes, int | None]:
        return b"", None

    def countersign_seal(self, run: str, finished: pb.RunFinished) -> bytes:
        return b""

    def undelivered(self, seqs, reason: str) -> None:
        pass

    def refusal(self, run: str, round_no: int, message: str, reason: str, detail: str) -> None:
        pass

    def dp_ledger(self, entry) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


class SiteAudit(NoAudit):
    """This site's audit log; the coordinator's log holds the other end of every boundary entry."""

    def __init__(self, folder: Path, site: str, tls: transport.TLSFiles, coordinator_name: str):
        self.folder, self.site, self.tls, self.peer = Path(folder), site, tls, coordinator_name
        self._open()

    def _open(self) -> None:
        """Raises security.audit.AuditError when the log cannot be opened or is damaged."""
        self._stamp = certificate_stamp(self.tls)
        self.log = AuditLog.open(self.folder, self.site, self.tls.key, self.tls.cert, sync="on_head")

    def rotate_if_needed(self) -> None:
        if certificate_stamp(self.tls) != self._stamp:
            # a rotated certificate: sign from now on with the key the coordinator sees us use
            self.log.close("certificate rotated")
            self._open()

    def config(self, run: str, config: dict, policy=None) -> None:
        """The run's config as the coordinator sent it, and the site policy it was judged by (its
        digest, its file and its rules), at every join."""
        extra = {} if policy is None else {"policy_sha256": policy.digest(), "policy_source": policy.source,
                                           "policy": json.loads(policy.to_json())}
        self.log.log_config(run=run, config=config, **extra)

    def boundary(self, run: str, direction: str, round_no: int, message: str, sha256: str, specs=(),
                 nbytes: int | None = None) -> int | None:
        """One message crossing the boundary to or from the coordinator, logged at both ends with
        the same name and digest. Returns the entry's seq."""
        sender, receiver = (self.site, self.peer) if direction == "send" else (self.peer, self.site)
        return self.log.log_boundary(run=run, round=round_no, direction=direction, sender=sender,
                                     receiver=receiver, message=message, sha256=sha256, tensors=specs,
                                     nbytes=nbytes).seq

    def countersign(self, run: str, assignment: pb.RoundAssignment) -> tuple[bytes, int | None]:
        """Countersign the coordinator's audit head named in the assignment, right before the message
        that carries the token is sent: (token, its entry's seq)."""
        if not assignment.audit_head_hash:
            return b"", None
        token = self.log.countersign((assignment.audit_head_seq, assignment.audit_head_hash), subject=self.peer, run=run,
                                     round=assignment.header.round)
        return token, self.log.head().seq

    def countersign_seal(self, run: str, finished: pb.RunFinished) -> bytes:
        """Countersign the coordinator's seal of the run (the token travels with Leave). Only the
        log's `close` may follow it: the final state's receipt is recorded before this."""
        if not finished.audit_head_hash:
            return b""
        return self.log.countersign((finished.audit_head_seq, finished.audit_head_hash), subject=self.peer,
                                    run=run, round=finished.header.round)

    def undelivered(self, seqs, reason: str) -> None:
        """Entries of messages that did not reach the coordinator: no receipt is to be expected."""
        for seq in seqs:
            if seq is not None:
                self.log.log_undelivered(ref_seq=seq, reason=reason[:300])

    def refusal(self, run: str, round_no: int, message: str, reason: str, detail: str) -> None:
        self.log.log_refusal(run=run, round=round_no, peer=self.peer, message=message, reason=reason,
                             detail=detail)

    def dp_ledger(self, entry) -> None:
        self.log.log_dp_ledger(entry)

    def close(self, reason: str) -> None:
        """Close the log at the end of the agent's life ("finished" or "shutdown")."""
        self.log.close(reason)
