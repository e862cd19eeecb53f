"""The federation's CA on disk: create it, issue and revoke certificates, publish the CRL.

Folder layout (`pki_dir`)::

    ca.key (0600)  ca.crt  crl.pem  registry.json
    issued/NAME.crt  issued/NAME.key (0600)

registry.json is the source of truth for what was issued and revoked; crl.pem is always
re-derived from it. Every write is atomic, and operations on one folder are serialised with an
advisory lock, so two operators running `issue` at once cannot lose a registry entry.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from cryptography import x509

from ..files import write_atomic, write_private
from . import policy, primitives
from .errors import PKIError

REGISTRY_FORMAT = "ktfed-pki-registry/1"


@dataclass(frozen=True)
class IssuedCert:
    name: str
    role: str
    serial: int
    fingerprint: str
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class CertRecord:
    """One registry entry: a certificate that was issued, and whether it was revoked."""
    name: str
    role: str
    serial: int
    fingerprint: str
    not_after: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def live(self) -> bool:
        return self.revoked_at is None


class _Paths:
    def __init__(self, pki_dir: str | os.PathLike[str]):
        self.root = Path(pki_dir)
        self.ca_key = self.root / "ca.key"
        self.ca_cert = self.root / "ca.crt"
        self.crl = self.root / "crl.pem"
        self.registry = self.root / "registry.json"
        self.issued = self.root / "issued"
        self.lock = self.root / ".lock"

    def cert(self, name: str) -> Path:
        return self.issued / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.issued / f"{name}.key"


# ---------------------------------------------------------------- public operations

def init_ca(pki_dir: str | os.PathLike[str], common_name: str = "ktfed federation CA",
            days: int = policy.DEFAULT_CA_DAYS, force: bool = False,
            crl_days: int = policy.DEFAULT_CRL_DAYS) -> Path:
    """Create the CA (key, self-signed certificate, empty registry, empty signed CRL).

    Refuses if a CA already exists, unless `force`: then the old CA, its registry and everything
    in issued/ are replaced, because certificates of the old CA are worthless under the new one.
    Returns the path of ca.crt.
    """
    policy.validate_days(days, "CA validity")
    policy.validate_days(crl_days, "CRL validity")
    if not isinstance(common_name, str) or not common_name.strip():
        raise PKIError(f"invalid CA common name {common_name!r}")
    paths = _Paths(pki_dir)
    # 0700: the folder holds the CA key; no one else needs to list it.
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(paths):
        existing = [p for p in (paths.ca_key, paths.ca_cert) if p.exists()]
        if existing and not force:
            raise PKIError(
                f"a CA already exists in {paths.root} ({', '.join(p.name for p in existing)}); "
                "replacing it (`--force`) invalidates every certificate it issued and invalidate every certificate it issued"
            )
        if force and paths.issued.exists():
            shutil.rmtree(paths.issued)
        key = primitives.generate_key()
        cert = primitives.build_ca_certificate(key, common_name, days)
        # Key first: a ca.crt without its key would look like a CA that cannot sign.
        write_private(paths.ca_key, primitives.private_key_to_pem(key))
        write_atomic(paths.ca_cert, primitives.cert_to_pem(cert))
        registry = {"format": REGISTRY_FORMAT, "ca_fingerprint": primitives.fingerprint(cert),
                    "crl_number": 0, "crl_days": crl_days, "certs": []}
        _publish(paths, registry, cert, key)
        paths.issued.mkdir(mode=0o700, exist_ok=True)
    return paths.ca_cert


def issue(pki_dir: str | os.PathLike[str], name: str, role: str,
          days: int = policy.DEFAULT_CERT_DAYS, sans: Sequence[str] = ()) -> IssuedCert:
    """Issue a key and certificate for `name` in `role`, written to issued/NAME.{key,crt}.

    Issuing a name that already has a live certificate is rotation: the new certificate gets a
    new serial, the old one stays valid (and listed in the registry) until revoked.
    """
    policy.validate_name(name)
    policy.validate_role(role)
    policy.validate_days(days, "certificate validity")
    subject = policy.subject_for(name, role)
    sans_list = policy.sans_for(role, sans)
    paths = _Paths(pki_dir)
    with _locked(paths):
        ca_cert, ca_key = _load_ca(paths)
        registry = _read_registry(paths, ca_cert)
        for entry in registry["certs"]:
            if entry["name"] == name and entry["role"] != role and entry["revoked_at"] is None:
                # One name, one role: otherwise a participant id could also act as an operator.
                raise PKIError(f"{name!r} already holds a live {entry['role']} certificate; "
                               f"revoke it before issuing it as {role}")
        now = primitives.utcnow()
        primitives.check_validity(ca_cert, now, what="CA certificate")
        # A certificate cannot usefully outlive the CA that vouches for it.
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        key = primitives.generate_key()
        cert = primitives.build_leaf_certificate(
            ca_cert=ca_cert, ca_key=ca_key, public_key=key.public_key(), subject=subject,
            extended_key_usages=policy.extended_key_usages_for(role), sans=sans_list,
            not_after=not_after, now=now,
        )
        record = CertRecord(name=name, role=role, serial=cert.serial_number,
                            fingerprint=primitives.fingerprint(cert),
                            not_after=cert.not_valid_after_utc, revoked_at=None)
        registry["certs"].append(_record_to_json(record))
        # Registry first: if we crash before the files are written, the registry names a
        # certificate nobody holds (harmless); the other order could leave a certificate in use
        # that `revoke` does not know about.
        write_atomic(paths.registry, _dump(registry))
        paths.issued.mkdir(mode=0o700, exist_ok=True)
        write_private(paths.key(name), primitives.private_key_to_pem(key))
        write_atomic(paths.cert(name), primitives.cert_to_pem(cert))
    return IssuedCert(name=name, role=role, serial=record.serial, fingerprint=record.fingerprint,
                      cert_path=paths.cert(name), key_path=paths.key(name))


def revoke(pki_dir: str | os.PathLike[str], name: str, serial: int | None = None) -> list[int]:
    """Revoke every live certificate of `name` (or only the one with `serial`, e.g. the old
    certificate after a rotation) and publish a new CRL; returns the serials revoked.

    The CRL is re-published even when nothing was live, so re-running `revoke` after a crash
    between the registry write and the CRL write still gets the revocation out.
    """
    policy.validate_name(name)
    paths = _Paths(pki_dir)
    with _locked(paths):
        ca_cert, ca_key = _load_ca(paths)
        registry = _read_registry(paths, ca_cert)
        mine = [e for e in registry["certs"] if e["name"] == name]
        if not mine:
            raise PKIError(f"no certificate was ever issued to {name!r} by the CA in {paths.root}")
        if serial is not None:
            mine = [e for e in mine if int(e["serial"], 16) == serial]
            if not mine:
                raise PKIError(f"{name!r} holds no certificate with serial {serial:x} (see registry.json)")
        now = primitives.utcnow()
        revoked = []
        for entry in mine:
            if entry["revoked_at"] is None:
                entry["revoked_at"] = _iso(now)
                revoked.append(int(entry["serial"], 16))
        _publish(paths, registry, ca_cert, ca_key)
    return revoked


def refresh_crl(pki_dir: str | os.PathLike[str]) -> Path:
    """Re-sign crl.pem with a fresh next_update (run it more often than every `crl_days`)."""
    paths = _Paths(pki_dir)
    with _locked(paths):
        ca_cert, ca_key = _load_ca(paths)
        _publish(paths, _read_registry(paths, ca_cert), ca_cert, ca_key)
    return paths.crl


def list_certs(pki_dir: str | os.PathLike[str]) -> list[CertRecord]:
    paths = _Paths(pki_dir)
    ca_cert = primitives.load_cert(_read(paths.ca_cert), what="CA certificate")
    return [_record_from_json(e) for e in _read_registry(paths, ca_cert)["certs"]]


def load_ca_bundle(pki_dir: str | os.PathLike[str]) -> bytes:
    """PEM of the CA certificate: the trust root every peer loads."""
    return _read(_Paths(pki_dir).ca_cert)


# ---------------------------------------------------------------- internals

@contextlib.contextmanager
def _locked(paths: _Paths) -> Iterator[None]:
    if not paths.root.is_dir():
        raise PKIError(f"{paths.root} is not a PKI folder (create one with `ktfed pki init --dir DIR`)")
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path} does not exist (create the PKI with `ktfed pki init --dir DIR`)") from None
    except OSError as err:
        raise PKIError(f"cannot read {path}: {err}") from None


def _load_ca(paths: _Paths):
    ca_cert = primitives.load_cert(_read(paths.ca_cert), what=f"CA certificate {paths.ca_cert}")
    ca_key = primitives.load_private_key(_read(paths.ca_key), what=f"CA key {paths.ca_key}")
    if ca_key.public_key() != ca_cert.public_key():
        raise PKIError(f"{paths.ca_key} does not belong to {paths.ca_cert}")
    return ca_cert, ca_key


def _read_registry(paths: _Paths, ca_cert: x509.Certificate) -> dict:
    try:
        registry = json.loads(_read(paths.registry))
    except json.JSONDecodeError as err:
        raise PKIError(f"{paths.registry} is not valid JSON: {err}") from None
    if not isinstance(registry, dict) or registry.get("format") != REGISTRY_FORMAT:
        raise PKIError(f"{paths.registry} is not a {REGISTRY_FORMAT} registry")
    if registry.get("ca_fingerprint") != primitives.fingerprint(ca_cert):
        raise PKIError(f"{paths.registry} belongs to a different CA than {paths.ca_cert}")
    return registry


def _publish(paths: _Paths, registry: dict, ca_cert, ca_key) -> None:
    """Sign a CRL of every revoked serial in the registry and write it as crl.pem."""
    now = primitives.utcnow()
    registry["crl_number"] = int(registry.get("crl_number", 0)) + 1
    revoked = [(int(e["serial"], 16), dt.datetime.fromisoformat(e["revoked_at"]))
               for e in registry["certs"] if e["revoked_at"] is not None]
    crl = primitives.build_crl(
        ca_cert=ca_cert, ca_key=ca_key, revoked=revoked, crl_number=registry["crl_number"],
        next_update=now + dt.timedelta(days=int(registry.get("crl_days", policy.DEFAULT_CRL_DAYS))),
        now=now,
    )
    # The registry (with the bumped CRL number) goes first so numbers never repeat.
    write_atomic(paths.registry, _dump(registry))
    write_atomic(paths.crl, primitives.crl_to_pem(crl))


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat(timespec="seconds")


def _record_to_json(record: CertRecord) -> dict:
    return {"name": record.name, "role": record.role, "serial": format(record.serial, "x"),
            "fingerprint": record.fingerprint, "not_after": _iso(record.not_after),
            "revoked_at": None if record.revoked_at is None else _iso(record.revoked_at)}


def _record_from_json(entry: dict) -> CertRecord:
    revoked_at = entry.get("revoked_at")
    return CertRecord(
        name=entry["name"], role=entry["role"], serial=int(entry["serial"], 16),
        fingerprint=entry["fingerprint"], not_after=dt.datetime.fromisoformat(entry["not_after"]),
        revoked_at=None if revoked_at is None else dt.datetime.fromisoformat(revoked_at),
    )


def _dump(registry: dict) -> bytes:
    return (json.dumps(registry, indent=2, sort_keys=False) + "\n").encode()
