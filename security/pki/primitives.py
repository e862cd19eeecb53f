"""X.509 building blocks: keys, certificates and CRLs, as objects and as PEM.

This module knows *how* to build and check; it does not know about roles, names, folders or the
registry (that is `policy` and `authority`). Every parse or check failure becomes a `PKIError`
that says what was wrong.
"""
from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import PKIError

# P-256: accepted by gRPC's BoringSSL, OpenSSL and every TLS 1.2/1.3 stack.
CURVE = ec.SECP256R1
# Certificates start a little in the past so a peer whose clock lags does not see them as not
# yet valid right after issuance.
BACKDATE = dt.timedelta(minutes=5)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---------------------------------------------------------------- keys and PEM

def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def private_key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: what gRPC's ssl_channel_credentials and Python's ssl load directly. The
    # file mode (0600) is the protection.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes, what: str = "private key") -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise PKIError(f"{what} is not a readable unencrypted PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{what} is a {type(key).__name__}, expected an EC (P-256) key")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_to_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_cert(data: bytes, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as err:
        raise PKIError(f"{what} is not a readable PEM certificate: {err}") from None


def check_key_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raise PKIError unless the private key belongs to the certificate (e.g. files caught mid-rotation)."""
    cert = load_cert(cert_pem)
    key = load_private_key(key_pem)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, spki)
            != key.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise PKIError("the certificate and the private key do not belong together")


def load_crl(data: bytes, what: str = "CRL") -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except (ValueError, TypeError) as err:
        raise PKIError(f"{what} is not a readable PEM CRL: {err}") from None


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lower-case hex (what `openssl x509 -fingerprint` shows)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


# ---------------------------------------------------------------- building

def build_ca_certificate(
    key: ec.EllipticCurvePrivateKey, common_name: str, days: int, now: dt.datetime | None = None
) -> x509.Certificate:
    now = now or utcnow()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: this CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_leaf_certificate(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    subject: x509.Name,
    extended_key_usages: Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName],
    not_after: dt.datetime,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    now = now or utcnow()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDSA in TLS signs the handshake; it never encrypts a key, so only digitalSignature.
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(extended_key_usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def build_crl(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: Iterable[tuple[int, dt.datetime]],
    crl_number: int,
    next_update: dt.datetime,
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    now = now or utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(next_update)
        # The CRL number lets a reader refuse an older (but validly signed) CRL put back in place.
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    for serial, revoked_at in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(revoked_at)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# ---------------------------------------------------------------- checking

def check_is_ca(ca_cert: x509.Certificate) -> None:
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PKIError(f"{ca_cert.subject.rfc4514_string()} is not a CA certificate")


def check_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    subject = cert.subject.rfc4514_string()
    if cert.issuer != ca_cert.subject:
        raise PKIError(
            f"certificate {subject} was issued by {cert.issuer.rfc4514_string()}, "
            f"not by this CA ({ca_cert.subject.rfc4514_string()})"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except InvalidSignature:
        raise PKIError(
            f"certificate {subject}: signature does not verify with the CA's key "
            "(same CA name, different key: a certificate from another CA)"
        ) from None
    except (ValueError, TypeError) as err:
        raise PKIError(f"certificate {subject} cannot be checked against this CA: {err}") from None


def check_validity(cert: x509.Certificate, now: dt.datetime | None = None, what: str = "") -> None:
    now = now or utcnow()
    label = what or f"certificate {cert.subject.rfc4514_string()}"
    if now < cert.not_valid_before_utc:
        raise PKIError(f"{label} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise PKIError(f"{label} expired on {cert.not_valid_after_utc.isoformat()}")


def check_crl(
    crl: x509.CertificateRevocationList, ca_cert: x509.Certificate, now: dt.datetime | None = None
) -> None:
    """The CRL is signed by this CA's key and current (last_update <= now <= next_update)."""
    now = now or utcnow()
    if crl.issuer != ca_cert.subject:
        raise PKIError(
            f"CRL was issued by {crl.issuer.rfc4514_string()}, "
            f"not by this CA ({ca_cert.subject.rfc4514_string()})"
        )
    if not crl.is_signature_valid(ca_cert.public_key()):
        raise PKIError("CRL signature does not verify with the CA's key")
    if crl.last_update_utc - BACKDATE > now:
        raise PKIError(f"CRL is dated in the future ({crl.last_update_utc.isoformat()})")
    if crl.next_update_utc is None:
        raise PKIError("CRL has no next_update: refusing a CRL that never expires")
    if now > crl.next_update_utc:
        raise PKIError(
            f"CRL expired on {crl.next_update_utc.isoformat()}: re-sign it (refresh_crl) "
            "so that revocations cannot be silently rolled back"
        )


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None
