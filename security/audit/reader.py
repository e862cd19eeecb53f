"""Reading an audit folder as bytes, without judging it (judging is `verify`'s job).

Folder layout, written by `AuditLog` and read by the auditor offline:

    DIR/audit.jsonl                 one canonical-JSON entry per line (see `entry`)
    DIR/certs/<sha256>.pem          every certificate that signed entries here, by fingerprint,
                                    plus the peers' certificates whose countersignatures this
                                    log recorded
    DIR/audit.jsonl.torn-<n>        a torn final line quarantined by `recover_torn` (if any)

The services keep DIR at STATE/audit; given a STATE folder, the reader finds the log there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import AuditError

LOG_FILE = "audit.jsonl"
CERTS_DIR = "certs"
LOCK_FILE = ".lock"
STATE_AUDIT_DIR = "audit"          # where the services keep it inside their state folder


@dataclass
class RawLog:
    directory: Path
    path: Path
    lines: list[bytes]                  # complete lines, newline stripped
    torn: bytes | None                  # bytes after the last newline (a torn append), if any
    certs: dict[str, bytes] = field(default_factory=dict)   # fingerprint -> PEM


def split_lines(data: bytes) -> tuple[list[bytes], bytes | None]:
    """Complete lines, and the trailing fragment that has no newline (None if there is none)."""
    if not data:
        return [], None
    parts = data.split(b"\n")
    tail = parts.pop()          # b"" when the data ends with a newline
    return parts, (tail if tail else None)


def read_raw(directory: str | Path) -> RawLog:
    """The log file's lines and the certificates beside it. Raises AuditError when `directory` is
    not an audit folder at all."""
    directory = Path(directory)
    if not directory.exists():
        raise AuditError(f"{directory}: no such folder")
    if not directory.is_dir():
        raise AuditError(f"{directory}: not a folder (give the folder that holds {LOG_FILE})")
    if not (directory / LOG_FILE).exists() and (directory / STATE_AUDIT_DIR / LOG_FILE).is_file():
        directory = directory / STATE_AUDIT_DIR     # a site's or the coordinator's state folder
    path = directory / LOG_FILE
    if not path.is_file():
        raise AuditError(f"{directory}: not an audit log (no {LOG_FILE} in it, nor in {STATE_AUDIT_DIR}/)")
    lines, torn = split_lines(path.read_bytes())
    return RawLog(directory, path, lines, torn, load_certs(directory))


def load_certs(directory: Path) -> dict[str, bytes]:
    certs = {}
    folder = Path(directory) / CERTS_DIR
    if folder.is_dir():
        for pem in sorted(folder.glob("*.pem")):
            certs[pem.stem] = pem.read_bytes()
    return certs
