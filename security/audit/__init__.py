"""The tamper-evident audit log: what crossed every boundary, what privacy it cost, and proof that
nobody rewrote it afterwards.

Every producer (the coordinator, each site) keeps its own append-only log: one canonical-JSON line
per entry, each entry hash-chained to the previous one and signed with the producer's certificate
key (ECDSA P-256, issued by the federation CA). Each round, a participant countersigns the
coordinator's chain head and the coordinator records that token, so neither side can rewrite its
history without the other's log showing it; at the end of a run the coordinator seals it and every
site countersigns the seal, so the last round is pinned too. `verify` checks all of it offline,
strictly unless asked for the partial reading.

Wiring (what the services call, and when; every method is thread-safe):

  both, at start     log = AuditLog.open(STATE/"audit", my_name, key_path_or_pem, cert_path_or_pem)
                     (TornTailError: refuse to start; reopen with recover_torn=True only when the
                     operator asks for it). At stop: log.close("shutdown").
  both, per run      log.log_config(run=run_id, config=resolved_config_dict)
  coordinator, task  head = log.head(); send head.seq and head.hash inside the task; then per site
                     log.log_boundary(direction="send", run=, round=, sender=me, receiver=site,
                     message="assignment", sha256=state_digest(specs), tensors=specs)   before sending
  participant, task  log.log_boundary(direction="receive", ... same fields ...)   after its checks
                     token = log.countersign((seq, hash), subject=coordinator, run=, round=)
  participant, DP    log.log_dp_ledger(settled_ledger_entry)                     after training
  participant, send  e = log.log_boundary(direction="send", message="update", ...) before sending;
                     send `token` (bytes) with the update; if the send finally fails:
                     log.log_undelivered(ref_seq=e.seq, reason=...)
  coordinator, recv  log.log_boundary(direction="receive", message="update", ...) after its checks
                     log.record_countersignature(token, signer_cert_pem=peer_cert) (on
                     CountersignatureError refuse the message: the refusal is already logged)
  coordinator, end   log.log_secagg(run=, round=, event="unmasked" | "aborted", threshold=t,
                     roster=, survivors=, dropouts={site: step}, reconstructed=[{"secret":
                     "self_mask" | "key", "of": site}, ...]); central DP: log.log_dp(level="user", ...)
  either, refusing   log.log_refusal(run=, round=, peer=, message=, reason=, detail=)
  coordinator, run   head = log.seal(run=, rounds=, reason=) when the run ends; send it in RunFinished
  participant, run   after the final state's receipt: token = log.countersign(head, subject=coordinator,
                     run=, round=); send it with Leave; log.close("finished")
  coordinator, leave log.record_countersignature(token, signer_cert_pem=peer_cert)

Both ends must name a message the same way ("assignment", "update", "secagg/<step>") and compute its
sha256 the same way (kt_core.codec.state_digest of the tensor specs; SHA-256 of the bytes for
SecAgg messages): `verify` matches every send with its receipt on (sender, receiver, run, round,
message) and then on every other recorded field (sha256, bytes, tensors).

Modules, from bytes to judgement:
  errors      AuditError, TornTailError, CountersignatureError
  canonical   the canonical JSON that hashes and signatures cover (RFC 8785 for our value subset)
  entry       Entry, Head, the hash and signature rules, countersignature tokens
  reader      the folder layout (audit.jsonl, certs/) and reading it as raw lines
  provenance  code versions, git commit, config digests
  log         AuditLog: open, append and the typed helpers, countersign, close
  certs       a signing certificate checked against the CA at an entry's time
  crosscheck  sends against receipts, countersignatures against chains (several logs per producer)
  strict      the whole set, the seals, nothing unpinned (the default reading)
  verify      verify(dirs, ca_cert, partial=, runs=) -> VerifyResult (first bad entry, cross-checks)
"""
from .canonical import as_float, canonical_bytes, normalize
from .entry import Entry, Head
from .errors import AuditError, CountersignatureError, Problem, TornTailError
from .log import KINDS, AuditLog
from .provenance import code_versions, config_sha256, git_commit
from .reader import CERTS_DIR, LOG_FILE
from .verify import LogView, VerifyResult, verify

__all__ = ["AuditLog", "Entry", "Head", "KINDS", "AuditError", "TornTailError", "CountersignatureError",
           "verify", "VerifyResult", "LogView", "Problem", "LOG_FILE", "CERTS_DIR", "as_float",
           "canonical_bytes", "normalize", "code_versions", "config_sha256", "git_commit"]
