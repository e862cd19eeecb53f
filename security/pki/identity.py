"""Reading who a certificate names, and checking it against the federation's CA."""
from __future__ import annotations

from dataclasses import dataclass

from cryptography.x509.oid import NameOID

from . import primitives
from .errors import PKIError
from .policy import ROLES, validate_name


@dataclass(frozen=True)
class PeerIdentity:
    name: str
    role: str
    serial: int
    fingerprint: str
    issuer: str


def identity_from_pem(cert_pem: bytes) -> PeerIdentity:
    """Who the certificate names (CN = name, OU = role).

    This does not verify the certificate: call it on a peer certificate that the TLS handshake
    already verified, or after `verify_chain`.
    """
    cert = primitives.load_cert(cert_pem)
    subject = cert.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    # Exactly one of each: with two CNs, different software would pick different ones as "the" name.
    if len(cns) != 1:
        raise PKIError(f"certificate subject {subject.rfc4514_string()!r} must have exactly one CN")
    if len(ous) != 1:
        raise PKIError(
            f"certificate subject {subject.rfc4514_string()!r} must have exactly one OU (the role)"
        )
    role = str(ous[0].value)
    if role not in ROLES:
        raise PKIError(f"certificate names unknown role {role!r}; roles are {', '.join(ROLES)}")
    return PeerIdentity(
        name=validate_name(str(cns[0].value)),
        role=role,
        serial=cert.serial_number,
        fingerprint=primitives.fingerprint(cert),
        issuer=cert.issuer.rfc4514_string(),
    )


def verify_chain(cert_pem: bytes, ca_cert_pem: bytes) -> None:
    """Raise PKIError unless `cert_pem` was signed by `ca_cert_pem` and both are within validity.

    Revocation is a separate question: see `RevocationList` / `RevocationWatcher`.
    """
    cert = primitives.load_cert(cert_pem)
    ca_cert = primitives.load_cert(ca_cert_pem, what="CA certificate")
    primitives.check_is_ca(ca_cert)
    primitives.check_validity(ca_cert, what="CA certificate")
    primitives.check_issued_by(cert, ca_cert)
    primitives.check_validity(cert)
