"""AuditLog: the append-only, hash-chained, signed log that one producer (the coordinator or a
site) keeps of what it did.

    log = AuditLog.open("state/audit", "site-a", key_pem, cert_pem)
    log.log_boundary(run=..., round=..., direction="send", sender="site-a", receiver="coordinator", ...)
    token = log.countersign(task_head, subject="coordinator", run=..., round=...)
    log.close()

Every append is one `write` of one line to a file opened O_APPEND, under a lock, followed by
fsync (`sync="always"`, the default): an entry is on disk before the call returns. With
`sync="on_head"` the fsync happens only when a head leaves the log (`head()`, `countersign`) and at
`close`: a head handed to a peer is still never lost, and a process crash loses nothing (the page
cache survives it), but a power loss may take the unsynced tail, which the verifier then reports
(cut or torn tail, receipts missing). Appends from several threads are serialised; a second process
opening the same folder is refused (an advisory file lock).

On reopen the whole chain is re-hashed (cheap) and the last signature checked before anything is
appended: a producer never extends a chain that does not verify. A torn last line (a crash in the
middle of a write) is reported with TornTailError and left alone unless the caller asks for
`recover_torn=True`: then the fragment is copied to audit.jsonl.torn-<n>, cut from the log, and a
`torn_tail` entry records its length and digest, so the repair itself is in the signed history.
"""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric import ec

from security.files import fsync_dir, write_atomic
from security.pki import identity_from_pem
from security.pki import primitives as pki

from . import provenance
from .canonical import normalize, sha256_hex, utc_timestamp
from .entry import (FORMAT, GENESIS_PREV_HASH, TOKEN_FORMAT, Entry, Head, entry_hash, entry_signature_ok,
                    head_of, parse_line, parse_token, sign_hash, sign_token, token_signature_ok)
from .errors import AuditError, CountersignatureError, TornTailError
from .reader import CERTS_DIR, LOCK_FILE, LOG_FILE, split_lines

# Kinds only this module writes (their bodies have a structure the verifier relies on).
RESERVED_KINDS = frozenset({"open", "resume", "close", "torn_tail", "countersign", "countersignature", "seal"})
# Kinds the typed helpers write; `append` accepts any other well-formed kind too.
KINDS = RESERVED_KINDS | {"config", "boundary", "undelivered", "dp", "secagg", "refusal"}
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
DIRECTIONS = ("send", "receive")
SYNC_MODES = ("always", "on_head")


def _load_key(key) -> ec.EllipticCurvePrivateKey:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    if isinstance(key, (str, Path)):
        key = Path(key).read_bytes()
    return pki.load_private_key(bytes(key))


def _load_pem(cert) -> bytes:
    return Path(cert).read_bytes() if isinstance(cert, (str, Path)) else bytes(cert)


class HashIndex:
    """The hash of every entry, by seq, as 32 raw bytes each in one buffer: a long-running
    coordinator appends hundreds of entries a round, and one Python string per entry grows its
    memory with the run's history (bench/soak.py measured ~0.5 MiB per round at 200 sites)."""

    def __init__(self, hashes=()):
        self._buf = bytearray()
        for h in hashes:
            self.append(h)

    def __len__(self) -> int:
        return len(self._buf) // 32

    def append(self, digest_hex: str) -> None:
        raw = bytes.fromhex(digest_hex)
        if len(raw) != 32:
            raise AuditError(f"an entry hash must be a SHA-256 digest, got {digest_hex!r:.80}")
        self._buf += raw

    def at(self, seq: int) -> str | None:
        return self._buf[32 * seq:32 * seq + 32].hex() if 0 <= seq < len(self) else None

    def last(self) -> str:
        return self._buf[-32:].hex() if self._buf else GENESIS_PREV_HASH


class AuditLog:
    """One producer's log. Create with `AuditLog.open`; all methods are thread-safe."""

    def __init__(self, directory: Path, producer: str, role: str, key: ec.EllipticCurvePrivateKey,
                 fingerprint: str, fd: int, lock_fd: int, hashes: HashIndex, sync: str = "always"):
        self.directory, self.producer, self.role = directory, producer, role
        self.path = directory / LOG_FILE
        self.fingerprint = fingerprint
        self._key, self._fd, self._lock_fd = key, fd, lock_fd
        # hash of every entry, by seq: checking countersignatures
        self._hashes = hashes
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._closed = False
        self._sync_each = sync == "always"
        self._dirty = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: str | os.PathLike, producer_id: str, key, cert_pem, *,
             recover_torn: bool = False, sync: str = "always") -> "AuditLog":
        """Open (or create) the log in `directory` for `producer_id`, signing with `key` (PEM bytes,
        a path, or a key object) under `cert_pem` (PEM bytes or a path), whose CN must be
        `producer_id`. A new log starts with an `open` entry, a reopened one gets a `resume` entry
        (naming the certificate, which may have been rotated). `sync`: "always" or "on_head" (see
        the module docstring)."""
        if sync not in SYNC_MODES:
            raise AuditError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        directory = Path(directory)
        key_obj, pem = _load_key(key), _load_pem(cert_pem)
        pki.check_key_pair(pem, pki.private_key_to_pem(key_obj))
        identity = identity_from_pem(pem)
        if identity.name != producer_id:
            raise AuditError(f"certificate names {identity.name!r}, not the producer {producer_id!r}")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CERTS_DIR).mkdir(exist_ok=True)
        lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise AuditError(f"{directory}: the audit log is already open (by this or another process)") from None
        try:
            cert_path = directory / CERTS_DIR / f"{identity.fingerprint}.pem"
            if not cert_path.exists():
                write_atomic(cert_path, pem)
            path = directory / LOG_FILE
            data = path.read_bytes() if path.exists() else b""
            lines, torn = split_lines(data)
            quarantined = None
            if torn is not None:
                quarantined = cls._handle_torn(directory, path, lines, torn, recover_torn)
            hashes, last_fp, last = cls._check_existing(directory, lines, producer_id)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            fsync_dir(directory)
        except BaseException:
            os.close(lock_fd)
            raise
        log = cls(directory, producer_id, identity.role, key_obj, identity.fingerprint, fd, lock_fd, hashes, sync)
        if last is None:
            log._append("open", {"format": FORMAT, "producer": producer_id, "role": identity.role,
                                 "certificate": identity.fingerprint, "log_id": secrets.token_hex(16)})
        else:
            if quarantined is not None:
                log._append("torn_tail", quarantined)
            log._append("resume", {"certificate": identity.fingerprint, "previous_certificate": last_fp,
                                   "after_close": last.kind == "close"})
        return log

    @staticmethod
    def _handle_torn(directory: Path, path: Path, lines: list[bytes], torn: bytes, recover: bool) -> dict:
        line_no = len(lines) + 1
        if not recover:
            raise TornTailError(
                f"{path}: line {line_no} is torn ({len(torn)} bytes without a newline: the producer "
                "stopped in the middle of an append, or the file was cut). Nothing was changed. "
                "Inspect it, then reopen with recover_torn=True to quarantine the fragment "
                "and record that in the log.", line_no, torn)
        n = 1
        while (directory / f"{LOG_FILE}.torn-{n}").exists():
            n += 1
        name = f"{LOG_FILE}.torn-{n}"
        write_atomic(directory / name, torn)
        keep = sum(len(line) + 1 for line in lines)
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
        return {"line": line_no, "bytes": len(torn), "sha256": sha256_hex(torn), "quarantined_to": name}

    @staticmethod
    def _check_existing(directory: Path, lines: list[bytes], producer: str):
        """Re-hash the chain; refuse to extend one that does not verify. Returns (hashes, the
        certificate fingerprint in force at the end, the last entry)."""
        hashes, prev, fp, last = HashIndex(), GENESIS_PREV_HASH, None, None
        for i, raw in enumerate(lines):
            where = f"{directory / LOG_FILE}: line {i + 1}"
            try:
                entry = parse_line(raw)
            except AuditError as err:
                raise AuditError(f"{where}: {err}; refusing to append to a log that does not verify") from None
            problem = None
            if entry.seq != i:
                problem = f"seq {entry.seq}, expected {i}"
            elif entry.prev_hash != prev:
                problem = "prev_hash does not match the previous entry"
            elif entry_hash(entry.core()) != entry.hash:
                problem = "hash does not match the content"
            elif entry.producer != producer:
                problem = f"producer {entry.producer!r}, this log is opened for {producer!r}"
            elif i == 0 and (entry.kind != "open" or entry.body.get("format") != FORMAT):
                problem = (f"the log is of format {entry.body.get('format')!r}, this ktfed writes {FORMAT!r} "
                           "(move the old log aside to start a new one)")
            if problem:
                raise AuditError(f"{where}: {problem}; refusing to append to a log that does not verify")
            if entry.kind in ("open", "resume"):
                fp = entry.body.get("certificate")
            hashes.append(entry.hash)
            prev, last = entry.hash, entry
        if last is not None:
            cert_file = directory / CERTS_DIR / f"{fp}.pem"
            if not cert_file.exists():
                raise AuditError(f"{cert_file}: the certificate that signed the last entry is missing")
            public = pki.load_cert(cert_file.read_bytes()).public_key()
            if not entry_signature_ok(public, last):
                raise AuditError(f"{directory / LOG_FILE}: the signature of the last entry (seq {last.seq}) "
                                 "does not verify; refusing to append")
        return hashes, fp, last

    # ------------------------------------------------------------------ appending
    def head(self) -> Head:
        """The last entry's (seq, hash): what a peer countersigns. On disk before it is returned."""
        with self._lock:
            self._sync_locked()
            return Head(len(self._hashes) - 1, self._hashes.last())

    def sync(self) -> None:
        """Force every entry so far to disk (only needed with sync="on_head")."""
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        if self._dirty and not self._closed:
            try:
                os.fsync(self._fd)
            except OSError as err:
                self._broken = str(err)
                raise AuditError(f"{self.path}: fsync failed: {err}") from err
            self._dirty = False

    def hash_at(self, seq: int) -> str | None:
        with self._lock:
            return self._hashes.at(seq)

    def append(self, kind: str, body: Mapping[str, Any]) -> Entry:
        """Append an entry of a kind of your own (the typed helpers below cover the usual ones)."""
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise AuditError(f"kind {kind!r} must match {_KIND_RE.pattern}")
        if kind in RESERVED_KINDS:
            raise AuditError(f"kind {kind!r} is written only by AuditLog itself")
        return self._append(kind, body)

    def _append(self, kind: str, body: Mapping[str, Any]) -> Entry:
        if not isinstance(body, Mapping):
            raise AuditError(f"body must be a mapping, got {type(body).__name__}")
        body = normalize(dict(body), f"{kind}.body")
        with self._lock:
            return self._append_locked(kind, body)

    def _append_locked(self, kind: str, body: dict) -> Entry:
        if self._closed:
            raise AuditError(f"{self.path}: the log is closed")
        if self._broken:
            raise AuditError(f"{self.path}: no appends after a failed write ({self._broken}); restart and "
                             "reopen the log to inspect its tail")
        prev = self._hashes.last()
        core = {"seq": len(self._hashes), "time": utc_timestamp(), "producer": self.producer,
                "kind": kind, "body": body, "prev_hash": prev}
        digest = entry_hash(core)
        entry = Entry(**core, hash=digest, signature=sign_hash(self._key, digest))
        line = entry.to_line()
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            if self._sync_each:
                os.fsync(self._fd)
            else:
                self._dirty = True
        except OSError as err:
            self._broken = str(err)
            raise AuditError(f"{self.path}: append failed: {err}") from err
        self._hashes.append(digest)
        return entry

    # ------------------------------------------------------------------ typed helpers
    def log_config(self, *, run: str, config: Mapping | str | bytes | None = None,
                   config_sha256: str | None = None, versions: Mapping[str, str] | None = None,
                   git_commit: str | None = None, include_config: bool = True, **extra) -> Entry:
        """The run's configuration (its SHA-256, and the resolved config itself unless
        `include_config=False`) and the code that runs it (package versions, git commit)."""
        body: dict[str, Any] = {"run": run}
        if config is not None:
            config_sha256 = config_sha256 or provenance.config_sha256(config)
            if include_config:
                body["config"] = config if isinstance(config, Mapping) else provenance.as_text(config)
        if not config_sha256:
            raise AuditError("log_config needs config or config_sha256")
        body["config_sha256"] = config_sha256
        body["versions"] = dict(versions) if versions is not None else provenance.code_versions()
        body["git_commit"] = git_commit if git_commit is not None else provenance.git_commit()
        return self.append("config", {**extra, **body})

    def log_boundary(self, *, run: str, round: int, direction: str, sender: str, receiver: str,
                     message: str, sha256: str | bytes, tensors: Iterable = (), nbytes: int | None = None,
                     **extra) -> Entry:
        """One message crossing a boundary, logged by each end: direction "send" by the sender
        before sending, "receive" by the receiver after checking it. `sha256` is the digest of the
        payload (for tensors: kt_core.codec.state_digest of their specs), the same at both ends.
        `tensors`: specs with name, dtype, shape, nbytes (attributes or keys)."""
        if direction not in DIRECTIONS:
            raise AuditError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        me = sender if direction == "send" else receiver
        if me != self.producer:
            raise AuditError(f"a {direction} entry in {self.producer}'s log must name {self.producer} as the "
                             f"{'sender' if direction == 'send' else 'receiver'}, not {me!r}")
        specs = [_tensor_spec(t) for t in tensors]
        digest = sha256.hex() if isinstance(sha256, (bytes, bytearray)) else str(sha256)
        total = nbytes if nbytes is not None else sum(s["bytes"] for s in specs)
        return self.append("boundary", {**extra, "run": run, "round": int(round), "direction": direction,
                                        "sender": sender, "receiver": receiver, "message": message,
                                        "tensors": specs, "bytes": int(total), "sha256": digest})

    def log_undelivered(self, *, ref_seq: int, reason: str) -> Entry:
        """A message this log recorded as sent (entry `ref_seq`) that did not reach its receiver, so
        the cross-check does not expect a receipt for it."""
        if not 0 <= ref_seq < len(self._hashes):
            raise AuditError(f"ref_seq {ref_seq} is not an entry of this log")
        return self.append("undelivered", {"ref_seq": int(ref_seq), "reason": reason})

    def log_dp(self, *, run: str, round: int, level: str, sample_rate: float, noise_multiplier: float,
               steps: int, max_grad_norm: float, delta: float, epsilon_round: float,
               epsilon_cumulative: float, accountant: str, accountant_version: str,
               budget: float | None = None, epsilon_cumulative_rdp: float | None = None,
               params: Mapping | None = None, **extra) -> Entry:
        """One DP accounting step: every parameter needed to recompute epsilon, and the result."""
        return self.append("dp", {**extra, "run": run, "round": int(round), "site": self.producer,
                                  "level": level, "sample_rate": sample_rate, "noise_multiplier": noise_multiplier,
                                  "steps": int(steps), "max_grad_norm": max_grad_norm, "delta": delta,
                                  "epsilon_round": epsilon_round, "epsilon_cumulative": epsilon_cumulative,
                                  "epsilon_cumulative_rdp": epsilon_cumulative_rdp, "budget": budget,
                                  "accountant": accountant, "accountant_version": accountant_version,
                                  "params": dict(params or {})})

    def log_dp_ledger(self, entry) -> Entry:
        """log_dp from a settled security.dp.ledger.LedgerEntry."""
        prv = entry.accountant == "prv"
        return self.log_dp(run=entry.run_id, round=entry.round, level=entry.level, sample_rate=entry.sample_rate,
                           noise_multiplier=entry.noise_multiplier, steps=entry.steps,
                           max_grad_norm=entry.max_grad_norm, delta=entry.delta,
                           epsilon_round=entry.eps_round_prv if prv else entry.eps_round_rdp,
                           epsilon_cumulative=entry.eps_cum(), epsilon_cumulative_rdp=entry.eps_cum_rdp,
                           budget=entry.budget, accountant=entry.accountant,
                           accountant_version=entry.accountant_version, params=entry.params,
                           ledger_seq=entry.seq, attempt_id=entry.attempt_id, state=entry.state)

    def log_secagg(self, *, run: str, round: int, event: str, threshold: int | None = None,
                   roster: Iterable[str] = (), survivors: Iterable[str] = (), dropouts: Mapping | Iterable = (),
                   reconstructed: Iterable[Mapping] = (), **extra) -> Entry:
        """A secure-aggregation event. `dropouts`: participant -> the step it dropped at (or a list
        of ids); `reconstructed`: one {"secret": "self_mask" | "key", "of": participant,
        "holders": [...]} per secret the server rebuilt from shares."""
        drops = dict(dropouts) if isinstance(dropouts, Mapping) else {d: "unknown" for d in dropouts}
        return self.append("secagg", {**extra, "run": run, "round": int(round), "event": event,
                                      "threshold": threshold, "roster": sorted(roster),
                                      "survivors": sorted(survivors), "dropouts": drops,
                                      "reconstructed": [dict(r) for r in reconstructed]})

    def log_refusal(self, *, run: str, round: int, peer: str, message: str, reason: str,
                    detail: str | None = None, **extra) -> Entry:
        """Something this producer refused: a stale or malformed message, an egress-guard refusal,
        a budget stop, a countersignature that does not match."""
        return self.append("refusal", {**extra, "run": run, "round": int(round), "peer": peer,
                                       "message": message, "reason": reason, "detail": detail})

    # ------------------------------------------------------------------ countersignatures
    def countersign(self, head, *, subject: str, run: str, round: int) -> bytes:
        """Countersign `subject`'s chain head (seq, hash), as it announced it for this round.

        The token also names this log's own head, so the subject's log in turn commits to this
        log's history. The token is recorded here (a `countersign` entry) and returned as bytes for
        the subject to record with `record_countersignature`."""
        head = head_of(head)
        with self._lock:
            own = Head(len(self._hashes) - 1, self._hashes.last())
            token = sign_token(self._key, {
                "format": TOKEN_FORMAT, "run": run, "round": int(round), "signer": self.producer,
                "signer_certificate": self.fingerprint, "signer_head": own.to_dict(),
                "subject": subject, "subject_head": head.to_dict(), "time": utc_timestamp()})
            # under the same lock: the countersign entry sits right after the head it names
            self._append_locked("countersign", normalize(token))
            self._sync_locked()      # the token names this log's head: it must outlive a crash
        return provenance.canonical_token(token)

    def record_countersignature(self, token: bytes | Mapping, signer_cert_pem: bytes | None = None) -> Entry:
        """Record a peer's countersignature of this log's head. Refused (CountersignatureError, and a
        `refusal` entry) if it names another subject or a head this chain does not have. With the
        signer's certificate (e.g. the TLS peer certificate), the signature is checked too and the
        certificate kept beside the log for offline verification."""
        try:
            token = parse_token(token if isinstance(token, (bytes, bytearray)) else dict(token))
            self._check_token(token, signer_cert_pem)
        except AuditError as err:
            signer = token.get("signer", "?") if isinstance(token, Mapping) else "?"
            rnd = token.get("round", -1) if isinstance(token, Mapping) else -1
            self.log_refusal(run=str(token.get("run", "?")) if isinstance(token, Mapping) else "?",
                             round=rnd if isinstance(rnd, int) else -1, peer=str(signer),
                             message="countersignature", reason="countersignature refused", detail=str(err))
            raise CountersignatureError(str(err)) from None
        return self._append("countersignature", {"token": token})

    def _check_token(self, token: dict, signer_cert_pem: bytes | None) -> None:
        if token["subject"] != self.producer:
            raise AuditError(f"token countersigns {token['subject']!r}, not {self.producer!r}")
        seq, claimed = token["subject_head"]["seq"], token["subject_head"]["hash"]
        actual = self.hash_at(seq)
        if actual is None:
            raise AuditError(f"token countersigns seq {seq}, beyond this log's head")
        if actual != claimed:
            raise AuditError(f"token countersigns hash {claimed[:16]}... at seq {seq}, this log has {actual[:16]}...")
        if signer_cert_pem is not None:
            identity = identity_from_pem(signer_cert_pem)
            if identity.name != token["signer"] or identity.fingerprint != token["signer_certificate"]:
                raise AuditError(f"token names signer {token['signer']!r} with certificate "
                                 f"{token['signer_certificate'][:16]}..., the certificate given is "
                                 f"{identity.name!r} {identity.fingerprint[:16]}...")
            if not token_signature_ok(pki.load_cert(signer_cert_pem).public_key(), token):
                raise AuditError(f"countersignature by {token['signer']!r} does not verify")
            path = self.directory / CERTS_DIR / f"{identity.fingerprint}.pem"
            if not path.exists():
                write_atomic(path, signer_cert_pem)

    # ------------------------------------------------------------------ closing
    def seal(self, *, run: str, rounds: int, reason: str) -> Head:
        """The signed last word of a run in this log: nothing of `run` follows but the peers'
        countersignatures of this very entry (and messages a peer's log records). Each peer
        countersigns the returned head and sends the token back for `record_countersignature`, so
        cutting or rewriting anything of the run up to here fails a strict `verify`."""
        with self._lock:
            entry = self._append_locked("seal", normalize({"run": run, "rounds": int(rounds), "reason": reason},
                                                          "seal.body"))
            self._sync_locked()      # the head leaves the log: it must outlive a crash
        return entry.head

    def close(self, reason: str | None = "shutdown") -> None:
        """Append a `close` entry (unless `reason` is None) and release the folder. A log that ends
        with `close` tells the auditor that nothing after it was cut off."""
        with self._lock:
            if self._closed:
                return
            try:
                if reason is not None and not self._broken:
                    self._append_locked("close", {"reason": reason})
                if not self._broken:
                    self._sync_locked()
            finally:
                self._closed = True
                os.close(self._fd)
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("shutdown" if exc_type is None else f"stopped by {exc_type.__name__}")


def _tensor_spec(t) -> dict:
    get = t.get if isinstance(t, Mapping) else (lambda k, d=None: getattr(t, k, d))
    name, shape, dtype = get("name"), get("shape"), get("dtype")
    nbytes = get("nbytes", None)
    if nbytes is None:
        nbytes = get("bytes", None)
    if name is None or shape is None or dtype is None or nbytes is None:
        raise AuditError(f"tensor spec {t!r} needs name, shape, dtype and nbytes")
    return {"name": str(name), "shape": [int(d) for d in shape], "dtype": str(dtype), "bytes": int(nbytes)}
