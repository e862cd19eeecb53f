"""One audit entry: its fields, its hash, its signature; and the countersignature token.

A line of audit.jsonl is the canonical JSON (see `canonical`) of an object with exactly these
fields:

    seq        0, 1, 2, ... with no gap
    time       RFC 3339 UTC, as the producer's clock saw it
    producer   the site id (= the CN of the certificate that signs)
    kind       what happened (see `log.KINDS`)
    body       the details, a JSON object
    prev_hash  the previous entry's `hash` (64 zeros for seq 0)
    hash       SHA-256 (hex) of the canonical JSON of the six fields above
    signature  base64 DER ECDSA-P256-SHA256 signature of ENTRY_DOMAIN + the 32 hash bytes

So each entry commits to every entry before it, and only the holder of the certificate's key can
make an entry that verifies. The domain strings keep these signatures from being replayed as
anything else the same key signs (TLS handshakes, countersignatures).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kt_core.bounded import BoundedInputError, loads_json

from .canonical import MAX_SAFE_INT, canonical_bytes, sha256_hex
from .errors import AuditError

# The log's format, named by its first ("open") entry. 2: the bodies say site_id/attempt_id and
# name the assignment message "assignment" (1 said participant_id/task_id and "task"). A log of
# format 1 is neither verified nor extended (the verifier and AuditLog.open name both formats):
# keep the ktfed that wrote it to read it. The entry and token structure, and so the signature
# domains below, did not change.
FORMAT = "ktfed-audit/2"
TOKEN_FORMAT = "ktfed-audit-countersign/1"
GENESIS_PREV_HASH = "0" * 64
ENTRY_DOMAIN = b"ktfed-audit/1 entry\x00"
TOKEN_DOMAIN = b"ktfed-audit/1 countersign\x00"
CORE_FIELDS = ("seq", "time", "producer", "kind", "body", "prev_hash")
FIELDS = CORE_FIELDS + ("hash", "signature")
MAX_DEPTH = 24                  # a config body nests a handful of levels; no honest entry comes near
MAX_TOKEN_BYTES = 16 * 1024     # a token is about 700 bytes
TOKEN_FIELDS = ("format", "run", "round", "signer", "signer_certificate", "signer_head", "subject",
                "subject_head", "time", "signature")


@dataclass(frozen=True)
class Head:
    """A chain head: the last entry's seq and hash (seq -1 for an empty chain)."""
    seq: int
    hash: str

    def to_dict(self) -> dict:
        return {"seq": self.seq, "hash": self.hash}


@dataclass(frozen=True)
class Entry:
    seq: int
    time: str
    producer: str
    kind: str
    body: dict
    prev_hash: str
    hash: str
    signature: str

    def core(self) -> dict:
        return {f: getattr(self, f) for f in CORE_FIELDS}

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in FIELDS}

    def to_line(self) -> bytes:
        return canonical_bytes(self.to_dict()) + b"\n"

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash)


def entry_hash(core: dict) -> str:
    return sha256_hex(canonical_bytes(core))


def sign_hash(key: ec.EllipticCurvePrivateKey, hash_hex: str) -> str:
    signature = key.sign(ENTRY_DOMAIN + bytes.fromhex(hash_hex), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def signature_ok(public_key, domain: bytes, message: bytes, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return False
    # base64 ignores the spare bits of its last character: without this check a flipped bit there
    # would leave a line that differs from what was signed and still verifies
    if base64.b64encode(signature).decode("ascii") != signature_b64:
        return False
    try:
        public_key.verify(signature, domain + message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def entry_signature_ok(public_key, entry: Entry) -> bool:
    return signature_ok(public_key, ENTRY_DOMAIN, bytes.fromhex(entry.hash), entry.signature)


def parse_line(raw: bytes) -> Entry:
    """Parse one line (without its newline) into an Entry, checking shape and canonical form.

    Does not check the hash or signature (that needs the chain and the certificate)."""
    data = read_json(raw, "entry")
    if not isinstance(data, dict):
        raise AuditError("not a JSON object")
    if set(data) != set(FIELDS):
        missing, extra = sorted(set(FIELDS) - set(data)), sorted(set(data) - set(FIELDS))
        raise AuditError(f"wrong fields (missing {missing}, unexpected {extra})")
    for name, kind in (("seq", int), ("time", str), ("producer", str), ("kind", str), ("body", dict),
                       ("prev_hash", str), ("hash", str), ("signature", str)):
        value = data[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise AuditError(f"field {name!r} is a {type(value).__name__}, expected {kind.__name__}")
    for name in ("prev_hash", "hash"):
        if not _is_hex64(data[name]):
            raise AuditError(f"field {name!r} is not 64 lower-case hex digits")
    try:
        canonical = canonical_bytes(data)
    except AuditError as err:
        raise AuditError(f"not canonical JSON: {err}") from None
    if canonical != raw:
        raise AuditError("not in canonical form (bytes differ from the canonical encoding of the same "
                         "content: the line was edited)")
    return Entry(**{f: data[f] for f in FIELDS})


def read_json(raw: bytes, what: str):
    """JSON from untrusted bytes, every failure an AuditError: canonical audit JSON nests a few
    levels and holds integers of at most 16 digits (2^53), so deeper or longer is refused before
    the parser recurses or converts it."""
    try:
        return loads_json(raw, max_depth=MAX_DEPTH, max_int_digits=16, what=what)
    except UnicodeDecodeError:
        raise AuditError(f"{what}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise AuditError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    except BoundedInputError as err:
        raise AuditError(f"not valid audit JSON: {err}") from None
    except RecursionError:   # a last resort: the depth scan above should make this unreachable
        raise AuditError(f"{what}: nested too deeply to read") from None


def _is_hex64(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# ---------------------------------------------------------------- countersignature tokens

def token_message(token: dict) -> bytes:
    return canonical_bytes({k: v for k, v in token.items() if k != "signature"})


def sign_token(key: ec.EllipticCurvePrivateKey, token_core: dict) -> dict:
    signature = key.sign(TOKEN_DOMAIN + canonical_bytes(token_core), ec.ECDSA(hashes.SHA256()))
    return {**token_core, "signature": base64.b64encode(signature).decode("ascii")}


def token_signature_ok(public_key, token: dict) -> bool:
    return signature_ok(public_key, TOKEN_DOMAIN, token_message(token), token.get("signature", ""))


def parse_token(data: bytes | dict) -> dict:
    """A countersignature token from its bytes (or already-parsed dict), checked for shape only."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > MAX_TOKEN_BYTES:
            raise AuditError(f"countersignature token of {len(data)} bytes (at most {MAX_TOKEN_BYTES})")
        token = read_json(bytes(data), "countersignature token")
    else:
        token = data
    if not isinstance(token, dict) or set(token) != set(TOKEN_FIELDS):
        raise AuditError(f"countersignature token must have exactly the fields {list(TOKEN_FIELDS)}")
    if token["format"] != TOKEN_FORMAT:
        raise AuditError(f"countersignature token format {token['format']!r}, expected {TOKEN_FORMAT!r}")
    for name in ("run", "signer", "signer_certificate", "subject", "time", "signature"):
        if not isinstance(token[name], str):
            raise AuditError(f"countersignature token field {name!r} must be a string")
    if not isinstance(token["round"], int) or isinstance(token["round"], bool) \
            or not 0 <= token["round"] <= MAX_SAFE_INT:
        raise AuditError(f"countersignature token field 'round' must be an integer in 0..{MAX_SAFE_INT}")
    for name in ("signer_head", "subject_head"):
        head = token[name]
        if (not isinstance(head, dict) or set(head) != {"seq", "hash"} or not isinstance(head["seq"], int)
                or isinstance(head["seq"], bool) or not -1 <= head["seq"] <= MAX_SAFE_INT
                or not isinstance(head["hash"], str)
                or not (_is_hex64(head["hash"]) or head["seq"] == -1)):
            raise AuditError(f"countersignature token field {name!r} must be {{seq, hash}}")
    return token


def head_of(value: Any) -> Head:
    """A Head from a Head, a (seq, hash) pair or a {seq, hash} mapping."""
    if isinstance(value, Head):
        return value
    if isinstance(value, dict):
        return Head(int(value["seq"]), str(value["hash"]))
    seq, hash_hex = value
    return Head(int(seq), str(hash_hex))
