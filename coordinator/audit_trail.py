"""The coordinator's side of the audit log (security/audit): what it sent to and received from
each site, the countersignatures sites return, secure-aggregation events and refusals.

The round engine calls these hooks; with no log (--insecure) they do nothing. A message pushed on
an assignment stream has no acknowledgement of its own: the site's next answer proves it arrived, and
what a site never answered before it dropped out is marked `undelivered` when the attempt closes,
so an auditor does not take a dropout for a coordinator that logged sends it never made.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from typing import Iterable, Mapping

from coordinator.errors import Code, Refusal
from security.audit import AuditError, AuditLog, CountersignatureError
from security.audit.canonical import MAX_SAFE_INT

log = logging.getLogger(__name__)


class AuditTrail:
    def __init__(self, audit: AuditLog | None, name: str):
        self.audit = audit
        self.name = name
        self._pending: dict[tuple[str, int], list[int]] = {}   # (site, round) -> unanswered send seqs
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.audit is not None

    def head(self) -> tuple[int, str]:
        if self.audit is None:
            return 0, ""
        head = self.audit.head()
        return head.seq, head.hash

    def config(self, run_id: str, config: Mapping) -> None:
        if self.audit is not None:
            self.audit.log_config(run=run_id, config=dict(config))

    # -- boundary crossings ---------------------------------------------------------------------
    def sent(self, run_id: str, round_no: int, site: str, message: str, sha256: str, specs: Iterable = (),
             *, awaits_answer: bool = True, nbytes: int | None = None) -> None:
        if self.audit is None:
            return
        _loggable(round_no)
        entry = self.audit.log_boundary(run=run_id, round=round_no, direction="send", sender=self.name,
                                        receiver=site, message=message, sha256=sha256, tensors=specs, nbytes=nbytes)
        if awaits_answer:
            with self._lock:
                self._pending.setdefault((site, round_no), []).append(entry.seq)

    def sent_bytes(self, run_id: str, round_no: int, site: str, message: str, payload: bytes) -> None:
        self.sent(run_id, round_no, site, message, hashlib.sha256(payload).hexdigest(), nbytes=len(payload))

    def received(self, run_id: str, round_no: int, site: str, message: str, sha256: str, specs: Iterable = (),
                 *, countersignature: bytes = b"", certificate: bytes | None = None,
                 nbytes: int | None = None) -> None:
        """A site's message, after its checks. Its countersignature (if any) is checked against the
        site's certificate and recorded; a bad one raises CountersignatureError (already logged)."""
        if self.audit is None:
            return
        _loggable(round_no)
        with self._lock:
            self._pending.pop((site, round_no), None)   # its answer shows our earlier pushes arrived
        self.audit.log_boundary(run=run_id, round=round_no, direction="receive", sender=site, receiver=self.name,
                                message=message, sha256=sha256, tensors=specs, nbytes=nbytes)
        if countersignature:
            self.audit.record_countersignature(countersignature, signer_cert_pem=certificate)

    def received_bytes(self, run_id: str, round_no: int, site: str, message: str, payload: bytes, **kwargs) -> None:
        self.received(run_id, round_no, site, message, hashlib.sha256(payload).hexdigest(), nbytes=len(payload),
                      **kwargs)

    def attempt_closed(self, round_no: int, reason: str) -> None:
        """Mark what no answer confirmed as of unknown delivery."""
        if self.audit is None:
            return
        with self._lock:
            pending = {k: v for k, v in self._pending.items() if k[1] == round_no}
            for key in pending:
                del self._pending[key]
        for (site, _), seqs in sorted(pending.items()):
            for seq in seqs:
                self.audit.log_undelivered(ref_seq=seq, reason=f"{site} did not answer before the attempt "
                                                               f"closed ({reason}); delivery unknown")

    # -- events ----------------------------------------------------------------------------------
    def secagg(self, run_id: str, round_no: int, event: str, summary: Mapping | None, dropouts: Mapping[str, str],
               threshold: int | None, roster: Iterable[str]) -> None:
        if self.audit is None:
            return
        summary = summary or {}
        reconstructed = [{"secret": "self_mask", "of": s} for s in summary.get("reconstructed_self_mask_of", ())] + \
                        [{"secret": "key", "of": s} for s in summary.get("reconstructed_mask_key_of", ())]
        self.audit.log_secagg(run=run_id, round=round_no, event=event, threshold=threshold, roster=list(roster),
                              survivors=list(summary.get("survivors", ())), dropouts=dict(dropouts),
                              reconstructed=reconstructed)

    def refusal(self, run_id: str, round_no: int, peer: str, message: str, code: str, reason: str) -> None:
        if self.audit is None:
            return
        try:
            self.audit.log_refusal(run=run_id, round=round_no, peer=peer, message=message, reason=code,
                                   detail=reason[:500])
        except AuditError as err:   # the refusal itself must still go out
            log.error("audit log: cannot record a refusal: %s", err)

    # -- the end of a run -------------------------------------------------------------------------
    def seal(self, run_id: str, rounds: int, reason: str) -> tuple[int, str]:
        """Seal the run's part of the log when it ends: the returned head goes out in RunFinished
        for every site to countersign (`seal_countersigned`). Nothing of the run may follow but
        those countersignatures and what the sites' logs record (their final state downloads)."""
        if self.audit is None:
            return 0, ""
        head = self.audit.seal(run=run_id, rounds=rounds, reason=reason)
        return head.seq, head.hash

    def seal_countersigned(self, site: str, token: bytes, certificate: bytes | None) -> None:
        """A site's countersignature of the seal (it came with Leave). A bad one raises
        CountersignatureError, already logged as a refusal."""
        if self.audit is not None and token:
            self.audit.record_countersignature(token, signer_cert_pem=certificate)

    def close(self, reason: str) -> None:
        if self.audit is not None:
            self.audit.close(reason)


def _loggable(round_no: int) -> None:
    """A round the log can hold (canonical JSON integers stop at 2^53 - 1): a peer's header naming
    a larger one is refused here rather than failing inside the log after the message was served."""
    if not 0 <= round_no <= MAX_SAFE_INT:
        raise Refusal(Code.INVALID_ARGUMENT, f"header.round {round_no} is outside 0..{MAX_SAFE_INT}")


__all__ = ["AuditTrail", "CountersignatureError"]
