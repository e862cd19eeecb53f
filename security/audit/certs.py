"""The certificates beside a log: is one issued by the federation CA, valid at an entry's time,
and does it name the producer?"""
from __future__ import annotations

from security.pki import PKIError, identity_from_pem
from security.pki import primitives as pki

from .canonical import parse_timestamp
from .errors import AuditError


def cn(pem: bytes) -> str:
    try:
        return identity_from_pem(pem).name
    except PKIError:
        return "unreadable"


def check_cert(pem: bytes, fingerprint: str, ca, name: str, at_time: str) -> dict:
    """What the report shows of a certificate, after checking it against the CA at `at_time`."""
    try:
        cert = pki.load_cert(pem)
        if pki.fingerprint(cert) != fingerprint:
            raise AuditError(f"certs/{fingerprint[:16]}...pem holds a different certificate")
        pki.check_issued_by(cert, ca)
        pki.check_validity(cert, now=parse_timestamp(at_time))
        identity = identity_from_pem(pem)
    except PKIError as err:
        raise AuditError(f"signed by a certificate the federation CA does not vouch for: {err}") from None
    if identity.name != name:
        raise AuditError(f"the certificate names {identity.name!r}, but the entries say they come from {name!r} "
                         "(a log moved to another site's folder, or a certificate swapped)")
    return {"name": identity.name, "role": identity.role, "serial": f"{identity.serial:x}",
            "fingerprint": fingerprint, "issuer": identity.issuer,
            "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat()}
